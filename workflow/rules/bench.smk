rule bench:
    input:
        target=f"{R}/target",
        export=f"{R}/export",
        code=stage_code("stages/bench.py", "bench", "engine", "speculative"),
    output:
        points=directory(f"{R}/bench/points"),
        sweep=report(f"{R}/bench/sweep.csv", caption="../report/sweep.rst", category="Benchmark"),
        best=f"{R}/bench/best_command.txt",
        readme=f"{R}/bench/README.md",
        metrics=f"{R}/bench/metrics.json",
        plots=report(directory(f"{R}/bench/plots"), patterns=["{name}.png"], caption="../report/plots.rst",
                     category="Benchmark"),
    params:
        py=PY,
        bench=config["bench"],
        out=output_parent("metrics"),
    log:
        f"{LOGS}/bench.log",
    benchmark:
        f"{LOGS}/times/bench.tsv"
    conda:
        "../envs/eaglepipe.yaml"
    threads: stage_threads()
    resources:
        gpu=gpus_for("bench"),
    shell:
        "{params.py} eaglepipe.stages.bench --params params.yaml --target {input.target} --export {input.export} "
        "--out {params.out} > {log} 2>&1"
