# eaglepipe workflow: the same stages as dvc.yaml, one shell line each.
from snakemake.utils import min_version

min_version("9.0")


configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/target.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/regen.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/bench.smk"


rule all:
    default_target: True
    input:
        f"{R}/bench/metrics.json",
