rule fetch_target:
    input:
        code=stage_code("stages/fetch_target.py", "target"),
    output:
        directory(f"{R}/target"),
    params:
        py=PY,
        target=config["target"],
    log:
        f"{LOGS}/fetch_target.log",
    benchmark:
        f"{LOGS}/times/fetch_target.tsv"
    conda:
        "../envs/eaglepipe.yaml"
    shell:
        "{params.py} eaglepipe.stages.fetch_target --params params.yaml --out {output} > {log} 2>&1"
