rule hidden_states:
    input:
        target=f"{R}/target",
        tokens=f"{R}/data/tokens",
        vocab=f"{R}/vocab",
        code=stage_code("stages/hidden_states.py", "train", "models"),
    output:
        directory(f"{R}/hidden"),
    params:
        py=PY,
        mode=config["train"]["mode"],
        offline_topk=config["train"]["offline_topk"],
    log:
        f"{LOGS}/hidden_states.log",
    benchmark:
        f"{LOGS}/times/hidden_states.tsv"
    conda:
        "../envs/eaglepipe.yaml"
    threads: stage_threads()
    resources:
        gpu=gpus_for("hidden_states"),
    shell:
        "{params.py} eaglepipe.stages.hidden_states --params params.yaml --target {input.target} "
        "--tokens {input.tokens} --vocab {input.vocab} --out {output} > {log} 2>&1"


rule train:
    input:
        target=f"{R}/target",
        tokens=f"{R}/data/tokens",
        vocab=f"{R}/vocab",
        hidden=f"{R}/hidden",
        code=stage_code("stages/train.py", "train", "models"),
    output:
        checkpoints=directory(f"{R}/train/checkpoints"),
        latest=f"{R}/train/LATEST",
        best=f"{R}/train/BEST",
        summary=f"{R}/train/summary.json",
        metrics=f"{R}/train/dvclive/metrics.json",
        plots=directory(f"{R}/train/dvclive/plots"),
    params:
        py=PY,
        train=config["train"],
        seed=config["seed"],
        out=output_parent("latest"),
    log:
        f"{LOGS}/train.log",
    benchmark:
        f"{LOGS}/times/train.tsv"
    conda:
        "../envs/eaglepipe.yaml"
    threads: stage_threads()
    resources:
        gpu=gpus_for("train"),
    shell:
        "{params.py} eaglepipe.stages.train --params params.yaml --target {input.target} --tokens {input.tokens} "
        "--vocab {input.vocab} --hidden {input.hidden} --out {params.out} > {log} 2>&1"
