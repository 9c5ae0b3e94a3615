"""The weight analysis at every validation: the figures against direct computation on a small model (mean squares and
singular values by torch.linalg.svdvals, the cautious fraction by the coordinates a step's decay moved), the same
figures from two gloo ranks as from one, one graph per shape when the optimizers' steps count the mask, the log lines
against the record's series in a tiny run that trains bit for bit as without the analysis, and compare.py's
--metric plots and diff table."""
import dataclasses
import json
import math
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import train_gpt as tg
from test_gpu import decay_counts_against_signs
from test_numerics import compile_steps, graphs_after_each_step, make_muon_params, process_group  # noqa: F401
from test_records import cli, record_json, write_run
from test_train import record_of, run_trainer, shards, tiny_args  # noqa: F401 (shards: a fixture)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "records"))
import compare  # noqa: E402

ADAM_WD = 0.005  # the README's cautious-Adam example, so that the Adam group's mask is counted too


def tiny_config(*flags) -> tg.Config:
    return tg.parse_config(["--preset=tiny", f"--adam_weight_decay={ADAM_WD}", *flags])


def parts_by_name(model: tg.GPT) -> dict[str, torch.Tensor]:
    """Every parameter by its name without '.weight', the attention's qkvo as its four (out, in) matrices."""
    parts = {}
    for name, p in model.named_parameters():
        if name.endswith(".qkvo"):
            dim = p.size(0)
            parts |= {name.removesuffix("qkvo") + m: W for m, W in zip("qkvo", p.detach().view(4, dim, dim))}
        else:
            parts[name.removesuffix(".weight")] = p.detach()
    return parts


def model_with_weights(cfg: tg.Config, seed: int, away_from_zero: bool = False) -> tg.GPT:
    """The tiny model with every weight drawn afresh: of magnitude 0.5 to 1.5 with a random sign where away_from_zero,
    else normal, with layer 3's Wo and lm_head at zero (singular matrices, whose condition number is undefined)."""
    torch.manual_seed(0)
    model = tg.GPT(cfg, 64, dist.get_world_size()).float()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            draw = torch.randn(p.shape, generator=gen)
            p.copy_(draw.sign() * (0.5 + torch.rand(p.shape, generator=gen)) if away_from_zero else draw)
        if not away_from_zero:
            model.blocks["3"].attn.qkvo.view(4, cfg.model_dim, -1)[3].zero_()
            model.lm_head.zero_()
    return model


def step_once(cfg: tg.Config, model: tg.GPT, seed: int):
    """Both optimizers' first step on gradients drawn from `seed`; returns them (the masks counted) and the grads."""
    optimizers = tg.make_optimizers(cfg, model)
    gen = torch.Generator().manual_seed(seed)
    grads = {name: torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    for opt in optimizers:
        opt.step()
    return optimizers, grads


# -----------------------------------------------------------------------------
# The figures against direct computation


def test_mean_squares_and_singular_values_match_svdvals_on_the_same_weights(process_group):
    cfg = tiny_config()
    model = model_with_weights(cfg, seed=1)
    figures = tg.measure_weights(model, tg.make_optimizers(cfg, model))
    parts = parts_by_name(model)
    assert figures.keys() == parts.keys() and len(parts) == 10 * 5 + 11 * 2 + 7
    json.dumps(figures, allow_nan=False)  # JSON has no NaN
    for name, W in parts.items():
        f, W64 = figures[name], W.double()
        assert f["size"] == W.numel() and f["mean_square"] == pytest.approx(W64.square().mean().item(), rel=1e-6), name
        if W.dim() == 1:  # the scalar vector
            assert f.keys() == {"group", "size", "mean_square"}
            continue
        s = torch.linalg.svdvals(W64)
        assert f["max_singular_value"] == pytest.approx(s[0].item(), rel=1e-5), name
        if s[0] == 0:
            assert f["condition_number"] is None, name
        else:  # float32's error on the smallest singular value grows with the condition number (at most ~1e3 here)
            assert f["condition_number"] == pytest.approx((s[0] / s[-1]).item(), rel=1e-3), name
    assert figures["blocks.3.attn.o"]["condition_number"] is None and figures["lm_head"]["max_singular_value"] == 0
    # before a step nothing has been counted; the decayed Adam tensors and NorMuon's matrices say so, the scalars
    # (wd_mul 0) have no fraction at all
    assert all(figures[name]["cautious_fraction"] is None for name in parts if name != "scalars")
    assert {f["group"] for f in figures.values()} == {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_in", "mlp_out",
                                                       "gates", "embed", "value_embed", "lm_head", "scalars"}


def test_group_figures_pool_coordinates_and_take_the_median_over_matrices(process_group):
    cfg = tiny_config()
    model = model_with_weights(cfg, seed=2)
    figures = tg.measure_weights(model, tg.make_optimizers(cfg, model))
    groups = tg.group_figures(figures)
    parts = parts_by_name(model)
    members = {"attn": [n for n in parts if re.fullmatch(r"blocks\.\d+\.attn\.[qkvo]", n)],
               "attn_o": [n for n in parts if n.endswith(".attn.o")],
               "mlp": [n for n in parts if ".mlp." in n], "gates": [n for n in parts if n.endswith("gate")],
               "value_embed": [f"value_embeds.{i}" for i in range(3)]}
    assert len(members["attn"]) == 40 and len(members["mlp"]) == 22 and len(members["gates"]) == 11
    for group, names in members.items():
        coordinates = torch.cat([parts[n].flatten().double() for n in names])
        assert groups[group]["mean_square"] == pytest.approx(coordinates.square().mean().item(), rel=1e-6), group
        conditions = []
        for n in names:
            s = torch.linalg.svdvals(parts[n].double())
            if s[-1] > 0:
                conditions.append((s[0] / s[-1]).item())
        assert groups[group]["condition_number"] == pytest.approx(statistics.median(conditions), rel=1e-3), group
    assert groups["scalars"].keys() == {"mean_square"}


def test_cautious_fraction_is_the_share_of_coordinates_the_decay_moved(process_group):
    """The same first step with and without decay: NorMuon's update does not depend on the weights, so the two
    results differ exactly where the cautious rule decayed (every weight is far from zero, so a decayed coordinate
    always moves). The Adam group's first update has the sign of the gradient: its mask is g * W >= 0."""
    cfg = tiny_config()
    decayed = model_with_weights(cfg, seed=3, away_from_zero=True)
    plain = model_with_weights(cfg, seed=3, away_from_zero=True)
    weights_before = {n: W.clone() for n, W in parts_by_name(decayed).items()}
    optimizers, grads = step_once(cfg, decayed, seed=4)
    step_once(dataclasses.replace(cfg, weight_decay=0.0, adam_weight_decay=0.0), plain, seed=4)
    figures = tg.measure_weights(decayed, optimizers)
    after, without_decay = parts_by_name(decayed), parts_by_name(plain)
    adam_tensors = {"embed": "embed.weight", "lm_head": "lm_head",
                    **{f"value_embeds.{i}": f"value_embeds.{i}.weight" for i in range(3)}}
    for name, W in after.items():
        if name == "scalars":  # not decayed (scalar_wd_mul 0)
            assert "cautious_fraction" not in figures[name]
            continue
        if name in adam_tensors:
            moved = grads[adam_tensors[name]] * weights_before[name] >= 0
        else:
            moved = W != without_decay[name]
        fraction = figures[name]["cautious_fraction"]
        assert fraction == moved.sum().item() / W.numel(), name
        assert 0.4 < fraction < 0.6 or W.numel() < 1000, (name, fraction)  # about half, on random signs


def test_mask_counts_of_every_matrix_shape_and_of_adam_match_the_update_signs(process_group):
    """The GPU test's check, eager on the CPU, where the steps with and without decay compute the same update bit for
    bit: the attention's four matrices, wide, tall and square ones, and the Adam group's decayed tensors."""
    miscounted, coordinates = decay_counts_against_signs(torch.device("cpu"))
    assert coordinates > 2000 and miscounted == 0


def two_rank_worker(rank: int, world: int, store: str, out: str):
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        figures = figures_after_a_step()
        if rank == 0:
            Path(out).write_text(json.dumps(figures))
        else:
            assert figures is None
    finally:
        dist.destroy_process_group()


def figures_after_a_step():
    cfg = tiny_config()
    model = model_with_weights(cfg, seed=5)
    optimizers, _ = step_once(cfg, model, seed=6)
    return tg.measure_weights(model, optimizers)


def test_two_gloo_ranks_give_the_figures_of_one(process_group, tmp_path):
    """Each rank measures only what it updates (its NorMuon matrices, every other Adam tensor) and counts the mask on
    its own rows of the Adam tensors; with the same gradients on both ranks (their mean is exact) rank 0 gathers the
    one-process figures bit for bit."""
    torch.multiprocessing.spawn(two_rank_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "two.json")),
                                nprocs=2)
    assert json.loads((tmp_path / "two.json").read_text()) == json.loads(json.dumps(figures_after_a_step()))


def test_counting_the_mask_adds_no_graph_and_counts_as_eager(process_group, compile_steps):
    """The optimizers' steps compiled as on CUDA, counting: one graph per function and shape from the first step on,
    through steps whose lr and momentum all differ, and the counts of the eager steps."""
    def counts_per_step():
        groups = [g for g in make_muon_params(seed=7) if g[0].shape in ((16, 64), (2, 12))]
        opt = tg.NorMuon([dict(params=g) for g in groups], lr=0.05, weight_decay=5.0, weight_decay_mode="cautious",
                         momentum=0.95, beta2=0.95, count_decayed=True)
        graphs = graphs_after_each_step(opt)
        counts = []
        for step, (lr, momentum) in enumerate([(0.05, 0.85), (0.04, 0.9), (0.03, 0.8)]):
            gen = torch.Generator().manual_seed(step)
            for group in opt.param_groups:
                group["lr"], group["momentum"] = lr, momentum
                for p in group["params"]:
                    p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
            counts.append([c.tolist() for c in opt.decayed.values()])
        return counts, graphs
    eager, _ = counts_per_step()
    compile_steps()
    compiled, graphs = counts_per_step()
    assert graphs[0] == 6 and graphs[-1] == graphs[0], graphs  # two per run (attention, MLP, gate), as without counts
    assert [len(c) for c in compiled[0]] == [4, 2, 1]  # a count per matrix: Wq, Wk, Wv, Wo; proj, fc; the gate
    assert compiled == eager


# -----------------------------------------------------------------------------
# A tiny run: its log lines and record, and the same training without the analysis

LINE = re.compile(r"analysis step:(\d+)((?: \w+(?: \w+:\S+)+)+)")


def logged_figures(text: str) -> dict[int, dict[str, dict[str, str]]]:
    """step -> group -> metric -> the text of the figure, from the analysis lines of a log."""
    out = {}
    for line in text.splitlines():
        if m := LINE.fullmatch(line):
            metric, figures = None, out.setdefault(int(m[1]), {})
            for word in m[2].split():
                if ":" in word:
                    group, value = word.split(":")
                    figures.setdefault(group, {})[metric] = value
                else:
                    metric = word
    return out


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} in the record")
    return json.loads(text, parse_constant=refuse)


def test_a_tiny_run_logs_and_records_its_analysis_and_trains_as_without(shards, tmp_path):
    steps = ["--max_steps=4", "--val_loss_every=2", f"--adam_weight_decay={ADAM_WD}"]
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    results = [run_trainer(tiny_args(shards, tmp_path / name, *steps, f"--checkpoint={tmp_path / name / 'model.pt'}",
                                     *extra), tmp_path / name) for name, extra in (("on", []), ("off", ["--analysis=off"]))]
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    (record, text), (plain_record, plain_text) = record_of(tmp_path / "on"), record_of(tmp_path / "off")
    record = strict_json((tmp_path / "on" / "logs" / record["log_file"]).with_suffix(".json").read_text())

    # the analysis changes nothing the run computes
    assert [v["val_loss"] for v in record["val"]] == [v["val_loss"] for v in plain_record["val"]]
    on, off = torch.load(tmp_path / "on" / "model.pt"), torch.load(tmp_path / "off" / "model.pt")
    assert [k for k in on if not torch.equal(on[k], off[k])] == []
    assert "analysis" not in plain_record and "analysis step:" not in plain_text.split(tg.SEPARATOR)[-1]

    analysis = record["analysis"]
    assert analysis["steps"] == [v["step"] for v in record["val"]] == [0, 2, 4]
    assert len(analysis["params"]) == 79 and {"attn", "mlp", "attn_q", "mlp_in", "embed"} <= analysis["groups"].keys()
    for name, series in [*analysis["groups"].items(), *analysis["params"].items()]:
        for metric in tg.ANALYSIS_METRICS:
            assert metric not in series or len(series[metric]) == 3, (name, metric)
    assert analysis["params"]["blocks.1.mlp.fc"]["group"] == "mlp_in"
    assert analysis["groups"]["mlp"]["cautious_fraction"][0] is None  # no step before step 0
    assert 0 < analysis["groups"]["embed"]["cautious_fraction"][-1] < 1

    # one line per validation, right after it, whose figures are the record's
    lines = text.split(tg.SEPARATOR)[-1].splitlines()
    for step in (0, 2, 4):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"step:{step}/80 val_loss:"))
        assert lines[at + 1].startswith(f"analysis step:{step} ")
    logged = logged_figures(text)
    assert sorted(logged) == [0, 2, 4]
    printed = {"mean_square": dict(rel=6e-4), "cautious_fraction": dict(abs=6e-4), "condition_number": dict(rel=6e-4)}
    for i, step in enumerate(analysis["steps"]):
        assert logged[step].keys() == {"attn", "mlp"}
        for group, figures in logged[step].items():
            assert figures.keys() == printed.keys()
            for metric, shown in figures.items():
                value = analysis["groups"][group][metric][i]
                assert (shown == "n/a") if value is None else float(shown) == pytest.approx(value, **printed[metric]), \
                    (step, group, metric)

    out = tmp_path / "mean_square.png"
    code, _, err = cli("plot", tmp_path / "on" / "logs", "--metric", "mean_square:mlp", "-o", out)
    assert code == 0 and out.stat().st_size > 10_000, err


# -----------------------------------------------------------------------------
# compare.py: --metric plots and the diff's table


def analysed_record(run_id: str, mlp_square: list, fraction: list | None = None, steps=(0, 200, 400)) -> dict:
    """A finished record of train_gpt.py with an analysis of two groups and one part."""
    record = record_json(run_id, {0: 10.8, 200: 3.6, 400: 3.28 + ord(run_id) / 1e4}, 400, 400, "finished")
    mlp = {"mean_square": mlp_square, "condition_number": [None, 4.0, 5.0], "max_singular_value": [0.0, 2.0, 3.0]}
    if fraction is not None:
        mlp["cautious_fraction"] = fraction
    record["analysis"] = {"steps": list(steps), "groups": {"mlp": mlp, "attn": {"mean_square": [1.0, 0.5, 0.25]}},
                          "params": {"blocks.1.mlp.fc": {"group": "mlp_in", "size": 4,
                                                         "mean_square": [1.0, 0.8, 0.6]}}}
    return record


def write_records(folder: Path, *records: dict) -> Path:
    folder.mkdir(parents=True)
    for record in records:
        (folder / f"{record['run_id']}.json").write_text(json.dumps(record))
    return folder


def test_plot_draws_a_weight_figure_of_runs_and_baseline_in_both_panels(tmp_path):
    runs = write_records(tmp_path / "cwd", analysed_record("a", [2.0, 0.4, 0.2], [None, 0.5, 0.4]),
                         analysed_record("b", [2.0, 0.5, 0.3], [None, 0.6, 0.5]))
    base = write_records(tmp_path / "nowd", analysed_record("c", [2.0, 1.5, 1.2]))
    sets = [compare.load_set([str(runs)], False), compare.load_set([str(base)], False)]
    fig = compare.figure(sets, "mean_square:mlp")
    full, last = fig.axes
    curves = [list(line.get_ydata()) for line in full.get_lines()]
    assert curves == [[2.0, 0.4, 0.2], [2.0, 0.5, 0.3], [2.0, 1.5, 1.2]]
    assert [line.get_color() for line in full.get_lines()] == ["C0", "C0", "C1"]
    low, high = last.get_ylim()
    assert low < 0.2 and 1.2 < high < 2.0  # the last third is scaled to its own points, those of step 400
    assert full.get_ylabel() == "mean square, mlp" and fig.get_suptitle() == "mean square, mlp"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["cwd (2 runs)", "nowd (1 run)"]  # no target line

    # an undefined figure is a gap; a part's series is found by its name
    (gap,) = compare.figure(sets[1:], "condition_number:mlp").axes[0].get_lines()
    assert math.isnan(gap.get_ydata()[0]) and list(gap.get_ydata()[1:]) == [4.0, 5.0]
    (part,) = compare.figure(sets[1:], "mean_square:blocks.1.mlp.fc").axes[0].get_lines()
    assert list(part.get_ydata()) == [1.0, 0.8, 0.6]

    out = tmp_path / "fraction.png"
    code, stdout, err = cli("plot", runs, "--baseline", base, "--metric", "cautious_fraction:mlp", "-o", out)
    assert code == 0 and str(out) in stdout and out.stat().st_size > 10_000
    assert err.splitlines() == ["warning: 1 run of nowd without cautious_fraction:mlp, not drawn"]


def test_plot_refuses_a_metric_no_run_has_and_names_those_there_are(tmp_path):
    runs = write_records(tmp_path / "cwd", analysed_record("a", [2.0, 0.4, 0.2]))
    code, _, err = cli("plot", runs, "--metric", "mean_sqaure:mlp", "-o", tmp_path / "x.png")
    assert (code, err) == (1, "error: --metric mean_sqaure:mlp: no run has it; did you mean --metric mean_square:mlp?\n")
    code, _, err = cli("plot", runs, "--metric", "mean_square:embedding", "-o", tmp_path / "x.png")
    assert code == 1 and err.startswith("error: --metric mean_square:embedding: no run has it; choose val_loss or "
                                        "METRIC:GROUP, METRIC one of mean_square, cautious_fraction, condition_number, "
                                        "max_singular_value and GROUP one of mlp, attn (or METRIC:PART")
    code, _, err = cli("plot", "record43", "--metric", "mean_square:mlp", "-o", tmp_path / "x.png")
    assert code == 1 and "no run here has weight figures" in err and "--analysis=on" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "cwd"]  # no picture written


def test_diff_puts_the_final_weight_figures_side_by_side_with_their_ratio(tmp_path):
    runs = write_records(tmp_path / "cwd", analysed_record("a", [2.0, 0.4, 0.2], [None, 0.5, 0.4]),
                         analysed_record("b", [2.0, 0.5, 0.3], [None, 0.6, 0.5]))
    base = write_records(tmp_path / "nowd", analysed_record("c", [2.0, 1.5, 1.0]))
    code, out, err = cli("diff", runs, "--baseline", base)
    assert code == 0, err
    lines = out.splitlines()
    start = lines.index("weights at the final validation (mean over runs)")
    assert lines[start + 1].split() == ["figure", "candidate", "n", "baseline", "n", "candidate", "/", "baseline"]
    assert [line.split() for line in lines[start + 2:]] == [
        ["mean_square:mlp", "0.25", "2", "1", "1", "0.250"],
        ["mean_square:attn", "0.25", "2", "0.25", "1", "1.000"],
        ["cautious_fraction:mlp", "0.45", "2", "n/a", "0", "n/a"],
        ["condition_number:mlp", "5", "2", "5", "1", "1.000"],
        ["max_singular_value:mlp", "3", "2", "3", "1", "1.000"]]  # the table ends the report
    code, out, _ = cli("diff", runs, "--baseline", base, "--json")
    report = json.loads(out)["analysis"]
    assert report["note"] is None and report["final"][2] == {"figure": "cautious_fraction:mlp", "runs": 0.45,
                                                             "runs_n": 2, "baseline": None, "baseline_n": 0,
                                                             "ratio": None}

    code, out, _ = cli("diff", runs, "--baseline", "record43")
    assert code == 0 and out.splitlines()[-1] == ("record43: no analysis figures (they are in the .json records of "
                                                  "train_gpt.py runs with --analysis=on, the default)")
    code, out, _ = cli("diff", "record43", "--baseline", "record42")
    assert "weights at the final validation" not in out and "analysis" not in out


def test_a_record_with_a_malformed_analysis_is_skipped_as_damaged(tmp_path):
    record = analysed_record("a", [2.0, 0.4])  # two values for three steps
    write_records(tmp_path / "runs", record)
    write_run(tmp_path / "runs", "fine", {0: 10.8, 400: 3.28})
    code, out, err = cli("summary", tmp_path / "runs")
    assert code == 0 and "1 run" in out
    assert err.splitlines() == [f"skipped {tmp_path / 'runs' / 'a.json'}: damaged record, field "
                                "analysis.groups.mlp.mean_square is missing or malformed; restore the file or leave it out"]
