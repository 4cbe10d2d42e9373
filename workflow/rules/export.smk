rule export:
    input:
        target=f"{R}/target",
        checkpoints=f"{R}/train/checkpoints",
        latest=f"{R}/train/LATEST",
        best=f"{R}/train/BEST",
        code=stage_code("stages/export.py", "export"),
    output:
        directory(f"{R}/export"),
    params:
        py=PY,
        export=config["export"],
        train_dir=input_parent("latest"),
    log:
        f"{LOGS}/export.log",
    benchmark:
        f"{LOGS}/times/export.tsv"
    conda:
        "../envs/eaglepipe.yaml"
    shell:
        "{params.py} eaglepipe.stages.export --params params.yaml --target {input.target} --train {params.train_dir} "
        "--out {output} > {log} 2>&1"
