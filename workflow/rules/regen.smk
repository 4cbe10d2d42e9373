rule regenerate:
    input:
        target=f"{R}/target",
        chat=f"{R}/data/chat",
        code=stage_code("stages/regenerate.py", "regen", "engine", "server"),
    output:
        directory(f"{R}/data/regen"),
    params:
        py=PY,
        regen=config["regen"],
    log:
        f"{LOGS}/regenerate.log",
    benchmark:
        f"{LOGS}/times/regenerate.tsv"
    conda:
        "../envs/eaglepipe.yaml"
    threads: stage_threads()
    resources:
        gpu=gpus_for("regenerate"),
    shell:
        "{params.py} eaglepipe.stages.regenerate --params params.yaml --target {input.target} "
        "--chat {input.chat} --out {output} > {log} 2>&1"
