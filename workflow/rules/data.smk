rule download:
    input:
        code=stage_code("stages/download.py", "data"),
    output:
        directory(f"{R}/data/raw"),
    params:
        py=PY,
        sources=config["data"]["sources"],
        max_samples=config["data"]["max_samples"],
        seed=config["data"]["seed"],
    log:
        f"{LOGS}/download.log",
    benchmark:
        f"{LOGS}/times/download.tsv"
    conda:
        "../envs/eaglepipe.yaml"
    shell:
        "{params.py} eaglepipe.stages.download --params params.yaml --out {output} > {log} 2>&1"


rule normalize:
    input:
        raw=f"{R}/data/raw",
        code=stage_code("stages/normalize.py", "data"),
    output:
        directory(f"{R}/data/chat"),
    params:
        py=PY,
        system_prompt=config["data"]["system_prompt"],
    log:
        f"{LOGS}/normalize.log",
    benchmark:
        f"{LOGS}/times/normalize.tsv"
    conda:
        "../envs/eaglepipe.yaml"
    shell:
        "{params.py} eaglepipe.stages.normalize --params params.yaml --raw {input.raw} --out {output} > {log} 2>&1"


rule tokenize:
    input:
        target=f"{R}/target",
        chat=f"{R}/data/regen",
        code=stage_code("stages/tokenize.py", "data"),
    output:
        directory(f"{R}/data/tokens"),
    params:
        py=PY,
        seq_length=config["data"]["seq_length"],
        val_fraction=config["data"]["val_fraction"],
    log:
        f"{LOGS}/tokenize.log",
    benchmark:
        f"{LOGS}/times/tokenize.tsv"
    conda:
        "../envs/eaglepipe.yaml"
    shell:
        "{params.py} eaglepipe.stages.tokenize --params params.yaml --target {input.target} "
        "--chat {input.chat} --out {output} > {log} 2>&1"


rule vocab:
    input:
        tokens=f"{R}/data/tokens",
        code=stage_code("stages/vocab.py", "data"),
    output:
        directory(f"{R}/vocab"),
    params:
        py=PY,
        vocab=config["vocab"],
    log:
        f"{LOGS}/vocab.log",
    benchmark:
        f"{LOGS}/times/vocab.tsv"
    conda:
        "../envs/eaglepipe.yaml"
    shell:
        "{params.py} eaglepipe.stages.vocab --params params.yaml --tokens {input.tokens} --out {output} > {log} 2>&1"
