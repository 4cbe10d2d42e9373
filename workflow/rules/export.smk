rule export:
    input:
        target=f"{R}/target",
        checkpoints=f"{R}/train/checkpoints",
        latest=f"{R}/train/LATEST",
        best=f"{R}/train/BEST",
        code=stage_code("stages/export.py", "export", "validate.py"),
    output:
        directory(f"{R}/export"),
    params:
        export=config["export"],
    log:
        f"{LOGS}/export.log",
    conda:
        "../envs/eaglepipe.yaml"
    shell:
        "{PY} eaglepipe.stages.export --params params.yaml --target {input.target} --train {R}/train "
        "--out {output} > {log} 2>&1"
