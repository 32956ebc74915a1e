"""nanobumble.plot: which figures a metrics.jsonl gives, and that they show the logged numbers."""

from __future__ import annotations

import json
import sys

import pytest

from nanobumble.base.errors import run_cli
from nanobumble.plot import main
from nanobumble.base.errors import ConfigError
from nanobumble.run.plots import build_figures, plot_run, smooth, write_plots
from nanobumble.store.run_files import read_metrics as read_records

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(output_dir, records: list[dict], tail: str = "") -> None:
    output_dir.mkdir(exist_ok=True)
    lines = "".join(json.dumps(record) + "\n" for record in records)
    (output_dir / "metrics.jsonl").write_text(lines + tail, encoding="utf-8")


def lines_by_label(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def only_axes(figure):
    (ax,) = figure.get_axes()
    return ax


def assert_pngs(written: dict[str, str], names: set[str]) -> None:
    assert set(written) == names
    for path in written.values():
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC, path


# A pretraining run as train_pretrain.py logs it: training scalars every step,
# validation on a line of its own at the same step.
PRETRAIN = [
    {"step": 1, "train/loss": 4.0, "train/lr": 1e-3, "train/grad_norm": 1.5, "train/tokens_per_sec": 100.0},
    {"step": 2, "train/loss": 2.0, "train/lr": 8e-4, "train/grad_norm": 1.0, "train/tokens_per_sec": 110.0},
    {"step": 2, "val/loss": 2.5, "val/bpb": 3.5},
    {"step": 3, "train/loss": 3.0, "train/lr": 5e-4, "train/grad_norm": 0.5, "train/tokens_per_sec": 120.0},
    {"step": 4, "train/loss": 1.0, "train/lr": 1e-4, "train/grad_norm": 0.25, "train/tokens_per_sec": 130.0},
    {"step": 4, "val/loss": 1.5, "val/bpb": 2.5},
]


def test_pretraining_figures_show_the_logged_values(tmp_path, capsys):
    write_metrics(tmp_path, PRETRAIN)
    written = write_plots(str(tmp_path))
    assert_pngs(written, {"loss", "lr", "grad_norm", "val", "throughput"})
    assert capsys.readouterr().out.count("wrote ") == 5  # a line per file

    figures = build_figures(PRETRAIN)
    loss = lines_by_label(only_axes(figures["loss"]))
    assert loss["train/loss"] == ([1, 2, 3, 4], [4.0, 2.0, 3.0, 1.0])
    # TensorBoard's smoothing 0.6: the points so far weighted 1, 0.6, 0.36, ... from the newest, normalised
    assert loss["train/loss (smoothed 0.6)"][1] == pytest.approx([4.0, 4.4 / 1.6, 5.64 / 1.96, 4.384 / 2.176])
    assert lines_by_label(only_axes(figures["lr"]))["train/lr"] == ([1, 2, 3, 4], [1e-3, 8e-4, 5e-4, 1e-4])
    assert lines_by_label(only_axes(figures["grad_norm"]))["train/grad_norm"][1] == [1.5, 1.0, 0.5, 0.25]
    assert lines_by_label(only_axes(figures["throughput"]))["train/tokens_per_sec"][1] == [100, 110, 120, 130]
    val_loss, val_bpb = figures["val"].get_axes()  # different units: a panel each
    assert lines_by_label(val_loss)["val/loss"] == ([2, 4], [2.5, 1.5])
    assert lines_by_label(val_bpb)["val/bpb"] == ([2, 4], [3.5, 2.5])


DPO = [
    {"step": step, "logps/chosen": -20.0 + step, "logps/rejected": -21.0 - step,
     "rewards/accuracies": acc, "rewards/chosen": 0.1 * step, "rewards/margins": 0.3 * step,
     "rewards/rejected": -0.2 * step, "train/loss": 0.7 - 0.1 * step, "train/lr": 5e-5,
     "train/grad_norm": 0.3, "train/tokens_per_sec": 200.0}
    for step, acc in ((1, 0.0), (2, 0.5), (3, 1.0))
] + [{"step": 3, "val/rewards/chosen": 0.25, "val/rewards/rejected": -0.5,  # validation: prefixed keys
        "val/drift/chosen": -0.05, "val/drift/rejected": -0.4}]


def test_dpo_figures_show_rewards_margins_accuracies_and_logps(tmp_path):
    write_metrics(tmp_path, DPO)
    written = write_plots(str(tmp_path))
    assert_pngs(written, {"loss", "lr", "grad_norm", "throughput", "rewards", "margins", "accuracies", "logps",
                          "drift"})

    figures = build_figures(read_records(str(tmp_path / "metrics.jsonl"))[0])
    rewards = lines_by_label(only_axes(figures["rewards"]))
    assert rewards["rewards/chosen"] == ([1, 2, 3], pytest.approx([0.1, 0.2, 0.3]))
    assert rewards["rewards/rejected"] == ([1, 2, 3], pytest.approx([-0.2, -0.4, -0.6]))
    assert rewards["val/rewards/chosen"] == ([3], [0.25])
    assert rewards["val/rewards/rejected"] == ([3], [-0.5])
    margins = lines_by_label(only_axes(figures["margins"]))
    assert margins["rewards/margins"] == ([1, 2, 3], pytest.approx([0.3, 0.6, 0.9]))
    assert lines_by_label(only_axes(figures["accuracies"]))["rewards/accuracies"] == ([1, 2, 3], [0.0, 0.5, 1.0])
    logps = lines_by_label(only_axes(figures["logps"]))
    assert logps["logps/chosen"] == ([1, 2, 3], [-19.0, -18.0, -17.0])
    assert logps["logps/rejected"] == ([1, 2, 3], [-22.0, -23.0, -24.0])
    assert lines_by_label(only_axes(figures["loss"]))["train/loss"][1] == pytest.approx([0.6, 0.5, 0.4])
    drift = lines_by_label(only_axes(figures["drift"]))
    assert drift["val/drift/chosen"] == ([3], [-0.05]) and drift["val/drift/rejected"] == ([3], [-0.4])


def test_smoothing_is_tensorboards_debiased_moving_average():
    values = [10.0] + [1.0] * 11  # a loss that falls at once and stays
    weight = 0.9
    # by hand: point t is sum_k w^(t-k) x_k / sum_k w^(t-k), the EMA from 0 divided by 1 - w^(t+1)
    expected = [sum(weight ** (t - k) * values[k] for k in range(t + 1)) / sum(weight ** j for j in range(t + 1))
                for t in range(len(values))]
    assert smooth(values, weight) == pytest.approx(expected, rel=1e-12)
    # the numerator of the last point is exactly 1: (1 - w) (10 w^11 + w^10 + ... + 1) = 1 + 9 w^11 - w^11 - ...
    assert smooth(values, weight)[-1] == pytest.approx(1 / (1 - weight ** 12), rel=1e-12)  # 1.39
    # (an average started at the first value ends at 1 + 9 * 0.9^11 = 3.82, held up by the first point)
    assert smooth([2.0, 4.0], 0.6)[0] == 2.0  # the first point is itself, not 0.4 * 2
    assert smooth([2.0, float("nan"), 4.0], 0.0)[::2] == [2.0, 4.0]  # 0: raw; a NaN is not averaged in
    smoothed = smooth([2.0, float("nan"), 4.0], 0.5)
    assert smoothed[0] == 2.0 and smoothed[1] != smoothed[1] and smoothed[2] == pytest.approx((1 + 4) / 1.5)


def test_the_smoothing_key_of_the_plot_program(tmp_path):
    write_metrics(tmp_path, PRETRAIN)
    main([str(tmp_path), "--smoothing", "0"])
    assert set(lines_by_label(only_axes(build_figures(PRETRAIN, 0)["loss"]))) == {"train/loss"}  # raw only
    assert "train/loss (smoothed 0.9)" in lines_by_label(only_axes(build_figures(PRETRAIN, 0.9)["loss"]))
    for bad in ("1", "-0.1", "x"):
        with pytest.raises(ConfigError, match="key 'smoothing'"):
            main([str(tmp_path), "--smoothing", bad])


def test_each_loss_is_labelled_with_what_it_is():
    records = [{"step": step, "train/loss": 0.9 - 0.1 * step, "train/preference_loss": 0.7 - 0.1 * step,
                "train/nll_loss": 2.0} for step in (1, 2)]
    records.append({"step": 2, "val/loss": 0.8, "val/preference_loss": 0.6, "val/nll_loss": 2.0})
    figures = build_figures(records)
    labels = {ax.get_ylabel(): lines_by_label(ax) for ax in figures["loss"].get_axes()}
    assert set(labels) == {"loss (total, as optimised)", "preference_loss (DPO family)",
                           "nll_loss (chosen answers, per token)"}
    assert labels["nll_loss (chosen answers, per token)"]["train/nll_loss"] == ([1, 2], [2.0, 2.0])
    assert {ax.get_ylabel() for ax in figures["val"].get_axes()} == set(labels)


def test_evaluation_accuracy_has_a_line_per_task():
    records = [{"step": 100, "eval/hellaswag/acc": 0.3, "eval/arc_easy/acc": 0.4, "eval/gsm8k/exact_match": 0.01,
                "eval/hellaswag/bpb": 1.2},
               {"step": 200, "eval/hellaswag/acc": 0.35, "eval/arc_easy/acc": 0.5, "eval/gsm8k/exact_match": 0.02,
                "eval/hellaswag/bpb": 1.1}]
    figures = build_figures(records)
    assert set(figures) == {"eval", "eval_bpb"}
    accuracy = lines_by_label(only_axes(figures["eval"]))
    assert accuracy == {"hellaswag acc": ([100, 200], [0.3, 0.35]), "arc_easy acc": ([100, 200], [0.4, 0.5]),
                        "gsm8k exact_match": ([100, 200], [0.01, 0.02])}
    assert lines_by_label(only_axes(figures["eval_bpb"])) == {"hellaswag": ([100, 200], [1.2, 1.1])}


def test_damaged_lines_and_missing_keys_still_plot_what_is_there(tmp_path, capsys):
    records = [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0, "train/lr": 1e-3}]
    lines = (json.dumps(records[0]) + "\n" + "not json\n" + '{"loss": 1.0}\n' + "[1, 2]\n"
             + json.dumps(records[1]) + "\n" + '{"step": 3, "train/lo')  # torn by a crash mid-write
    tmp_path.joinpath("metrics.jsonl").write_text(lines, encoding="utf-8")
    stale = tmp_path / "plots" / "rewards.png"  # from an earlier DPO run in the same directory
    stale.parent.mkdir()
    stale.write_bytes(PNG_MAGIC)

    written = write_plots(str(tmp_path))
    assert_pngs(written, {"loss", "lr"})
    assert "skipped 4 damaged lines" in capsys.readouterr().out
    assert not stale.exists()
    figures = build_figures(read_records(str(tmp_path / "metrics.jsonl"))[0])
    assert lines_by_label(only_axes(figures["loss"]))["train/loss"] == ([1, 2], [3.0, 2.0])
    assert lines_by_label(only_axes(figures["lr"]))["train/lr"] == ([2], [1e-3])


def test_cli_takes_the_directory_as_a_word_or_as_output_dir(tmp_path):
    for name, argv in (("a", [str(tmp_path / "a")]), ("b", ["--output_dir", str(tmp_path / "b")])):
        write_metrics(tmp_path / name, PRETRAIN)
        main(argv)
        assert sorted(p.name for p in (tmp_path / name / "plots").iterdir()) == \
            ["grad_norm.png", "loss.png", "lr.png", "throughput.png", "val.png"]


def test_cli_refuses_a_missing_directory_or_metrics_file(tmp_path, monkeypatch, capsys):
    nope = str(tmp_path / "nope")
    for argv, message in (([nope], "no such directory"), ([str(tmp_path)], "has no metrics.jsonl"),
                          (["--output_dir", nope], "no such directory"),
                          ([], "key 'output_dir' is required (OUTPUT_DIR or --output_dir)"),
                          ([nope, nope], f"expected --key value, got {nope!r}"),
                          (["--output", nope], "unknown key 'output'; did you mean output_dir?")):
        monkeypatch.setattr(sys, "argv", ["plot", *argv])
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_plot_run_never_raises(tmp_path, monkeypatch, capsys):
    assert plot_run(str(tmp_path / "nope")) == {}
    assert "no such directory" in capsys.readouterr().out

    write_metrics(tmp_path, PRETRAIN)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert plot_run(str(tmp_path)) == {}
    assert "pip install matplotlib" in capsys.readouterr().out
    assert not (tmp_path / "plots").exists()
