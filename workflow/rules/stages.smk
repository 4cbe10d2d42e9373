# One rule per declared stage (src/eaglepipe/workflow/pipeline.py); dvc.yaml is generated from the same list.
# Code inputs are the stage module's import closure, so editing any module it runs reruns the rule
# (Snakemake itself hashes only the shell text). params holds the params.yaml keys the stage reads.
for stage in STAGES:

    rule:
        name:
            stage.name
        input:
            data=[f"{R}/{d}" for d in stage.deps],
            code=code_deps(stage, workflow.basedir),
        output:
            [rule_output(o) for o in stage.outs],
        params:
            # the shell line reads the loop's values through params: `shell:` is formatted when the job runs
            cmd=command(stage, R),
            config=params_values(stage, config),
        log:
            f"{LOGS}/{stage.name}.log",
        benchmark:
            f"{LOGS}/times/{stage.name}.tsv"
        conda:
            "../envs/eaglepipe.yaml"
        threads: stage_threads() if stage.threads else 1
        resources:
            gpu=gpu_count(stage, config),
        shell:
            "{params.cmd} > {log} 2>&1"
