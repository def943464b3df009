# Stage 9: the scaling-curve fit, the figures, and the synthesis summary shown in the Snakemake report.
# Inputs are only finished tables and reports, so `snakemake results/figures/scaling_curve.png` redraws a plot
# from existing results (docs/figures.md). Logic: workflow_scripts/fit_scaling.py and figures.py.
# Input and params functions of these rules: rules/common.smk.


rule fit_scaling:
    input:
        table=QA_TABLE,
    output:
        report(f"{FIGURES}/scaling_fit.json", caption="../report/scaling_fit.rst", category="Scaling curve"),
    log:
        f"{LOGS}/figures/fit_scaling.log",
    params:
        cfg=figures_params(FIT_KEYS),
    conda:
        "../envs/base.yaml"
    shell:
        "python -m workflow_scripts.fit_scaling --table {input.table} --config-json {params.cfg:q} "
        "--output {output} 2> {log}"


rule plot_scaling:
    input:
        table=QA_TABLE,
        fit=rules.fit_scaling.output[0],
    output:
        report(f"{FIGURES}/scaling_curve.png", caption="../report/scaling_curve.rst", category="Scaling curve"),
        figure_extras("scaling_curve"),
    log:
        f"{LOGS}/figures/plot_scaling.log",
    params:
        cfg=figures_params(SCALING_KEYS, "run_name", "models", "data"),
    conda:
        "../envs/base.yaml"
    shell:
        "python -m workflow_scripts.figures scaling --table {input.table} --fit {input.fit} "
        "--config-json {params.cfg:q} --output {output} 2> {log}"


rule plot_diversity:
    input:
        # filtered variants (rules/filters.smk) are drawn beside their sources: what the filters changed
        reports=synth_files("report") + [f"results/filtered/{v}/report.json" for v in filter_variants(config)],
    output:
        report(f"{FIGURES}/diversity.png", caption="../report/diversity.rst", category="Synthetic data"),
        figure_extras("diversity"),
    log:
        f"{LOGS}/figures/plot_diversity.log",
    params:
        cfg=figures_params(DIVERSITY_KEYS, "run_name", "models", "data"),
    conda:
        "../envs/base.yaml"
    shell:
        "python -m workflow_scripts.figures diversity --reports {input.reports} "
        "--config-json {params.cfg:q} --output {output} 2> {log}"


rule synthesis_summary:
    input:
        ledgers=synth_files("ledger"),
        reports=synth_files("report"),
    output:
        csv="results/tables/synthesis_summary.csv",
        html=report("results/tables/synthesis_summary.html", caption="../report/synthesis_summary.rst",
                    category="Synthetic data"),
    log:
        f"{LOGS}/figures/synthesis_summary.log",
    conda:
        "../envs/base.yaml"
    shell:
        "python -m workflow_scripts.figures synthesis-table --ledgers {input.ledgers} --reports {input.reports} "
        "--csv {output.csv} --html {output.html} 2> {log}"


ALL_TARGETS.extend(
    [
        *rules.fit_scaling.output,
        *rules.plot_scaling.output,
        *rules.plot_diversity.output,
        *rules.synthesis_summary.output,
    ]
)
