# eaglepipe workflow: the rules are built from the stage declarations in src/eaglepipe/workflow/pipeline.py,
# the same ones dvc.yaml is generated from.
from snakemake.utils import min_version

min_version("9.0")


configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/stages.smk"


rule all:
    default_target: True
    input:
        [f"{R}/{out.path}" for stage in STAGES for out in stage.outs],
