# Stage 9: the scaling-curve fit, the figures, and the synthesis summary shown in the Snakemake report.
# Inputs are only finished tables and reports, so `snakemake results/figures/scaling_curve.png` redraws a plot
# from existing results (docs/figures.md). Logic: workflow_scripts/fit_scaling.py and figures.py.
# Input and params functions of these rules: rules/common.smk.


rule fit_scaling:
    input:
        table=QA_TABLE,
    output:
        report(layout.SCALING_FIT, caption="../report/scaling_fit.rst", category="Scaling curve"),
    log:
        f"{LOGS}/figures/fit_scaling.log",
    localrule: True
    conda:
        "../envs/base.yaml"
    params:
        cfg=job_config("fit_scaling"),
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
    localrule: True
    conda:
        "../envs/base.yaml"
    params:
        cfg=job_config("plot_scaling"),
    shell:
        "python -m workflow_scripts.figures scaling --table {input.table} --fit {input.fit} "
        "--config-json {params.cfg:q} --output {output} 2> {log}"


rule plot_diversity:
    input:
        # filtered variants (rules/filters.smk) are drawn beside their sources: what the filters changed
        reports=synth_files("report") + [f"{layout.FILTERED}/{v}/report.json" for v in filter_variants(config)],
    output:
        report(f"{FIGURES}/diversity.png", caption="../report/diversity.rst", category="Synthetic data"),
        figure_extras("diversity"),
    log:
        f"{LOGS}/figures/plot_diversity.log",
    localrule: True
    conda:
        "../envs/base.yaml"
    params:
        cfg=job_config("plot_diversity"),
    shell:
        "python -m workflow_scripts.figures diversity --reports {input.reports} "
        "--config-json {params.cfg:q} --output {output} 2> {log}"


rule synthesis_summary:
    input:
        ledgers=synth_files("ledger"),
        reports=synth_files("report"),
    output:
        csv=f"{layout.SYNTH_SUMMARY}.csv",
        html=report(
            f"{layout.SYNTH_SUMMARY}.html", caption="../report/synthesis_summary.rst", category="Synthetic data"
        ),
    log:
        f"{LOGS}/figures/synthesis_summary.log",
    localrule: True
    conda:
        "../envs/base.yaml"
    shell:
        "python -m workflow_scripts.figures synthesis-table --ledgers {input.ledgers} --reports {input.reports} "
        "--csv {output.csv} --html {output.html} 2> {log}"


ALL_TARGETS.extend(layout.stage_targets(config, "figures"))
