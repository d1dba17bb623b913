"""``results.png`` of the bench job: step times and the tokens each sub-layer saw, per run."""

STAGE_COLOURS = {"protected": "#d9d9d9", "ssm": "#cfe3f7", "idm": "#fbe3c7"}
STAGE_NAMES = {"protected": "protected (exact)", "ssm": "structure (SSM)", "idm": "detail (IDM)"}


def _title(result):
    cfg, env = result["config"], result.get("environment", {})
    backends = sorted({str(r.get("resolved_backend")) for r in result["runs"] if r.get("preset")})
    size = cfg.get("latent", 0) * 8
    return (f"{cfg.get('family')} {cfg.get('layers')} blocks C={cfg.get('width')}, {size}x{size} px "
            f"(N={cfg.get('num_tokens')}), {cfg.get('steps')} steps, {cfg.get('dtype')}\n"
            f"{env.get('device', cfg.get('device'))}; SDTM backend {', '.join(backends) or '-'}")


def _shade_stages(ax, run):
    """Background bands for protected / structure / detail steps of ``run``."""
    seen = set()
    for row in run.get("tokens_per_step", []):
        mode = row["mode"]
        if mode in STAGE_COLOURS:
            label = None if mode in seen else STAGE_NAMES[mode]
            seen.add(mode)
            ax.axvspan(row["step"] - 0.5, row["step"] + 0.5, color=STAGE_COLOURS[mode], alpha=0.6, lw=0,
                       label=label)


def plot(result, path):
    """Write the figure to ``path``; returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    sdtm_runs = [r for r in result["runs"] if r.get("preset")]
    if sdtm_runs:  # the stages of the first SDTM run (all presets share the schedule's stages)
        _shade_stages(ax1, sdtm_runs[0])
        _shade_stages(ax2, sdtm_runs[0])
    for i, run in enumerate(result["runs"]):
        colour = f"C{i}"
        ax1.plot(run["step_ms"], color=colour, marker=".", label=run["name"])
        steps = [row["step"] for row in run["tokens_per_step"]]
        ax2.plot(steps, [row["attn"] for row in run["tokens_per_step"]], color=colour, ls="-",
                 label=f"{run['name']} attention")
        ax2.plot(steps, [row["mlp"] for row in run["tokens_per_step"]], color=colour, ls="--",
                 label=f"{run['name']} MLP")
    ax1.set(xlabel="denoising step", ylabel="ms per step (min over repeats)", title="step time")
    ax2.set(xlabel="denoising step", ylabel="image tokens (mean over blocks)", title="tokens per sub-layer")
    ax1.legend(fontsize=7, loc="best")
    ax2.legend(fontsize=7, loc="best")
    fig.suptitle(_title(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
