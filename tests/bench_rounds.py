"""Rounds of DPO on the model's own answers, against SFT and against NLL-only training.

    python tests/bench_rounds.py --task words --seeds 0,1,2 --pretrained DIR     # the README's table
    python tests/bench_rounds.py --task sums --seeds 0 --work_dir /tmp/br --pretrained DIR
    python -m pytest -m bench_long tests/bench/test_bench_rounds.py -s

For each seed, on a checkable task (words: tests/word_task.py, checked exactly;
sums: tests/sum_task.py, checked by the number), each stage a subprocess as a
user would run it:

    SFT      train_sft.py at its defaults from the pretrained model (DIR, or the
             no-argument pretraining when --pretrained is not given)
    round r  python -m nanobumble.sample_pairs from the model of round r-1 on
             --prompts training prompts (a new slice each round) -> pairs;
             train_dpo.py from that model on the pairs (LoRA, sft_weight, its
             reference: that model; eval_tasks: the dev prompts, so each round's
             exact match is in its metrics and plots); python -m nanobumble.merge_lora
             -> the model of round r
    control  the same steps without the preference: train_sft.py from the control
             model of round r-1 with LoRA on the chosen answers of round r's pairs
             (same LoRA targets, learning rate, batch, epochs: the same steps), merged

After each stage: greedy exact match on the dev prompts (what the rounds' settings
were tuned on) and on the held-out prompts (what is reported), through the chat
template, case-sensitive for words, by the number for sums. Every stage runs in
--precision (fp32 unless told), with the task's settings in ROUND_SETTINGS (tuned
on its dev prompts; --KEY overrides one). Prints one table: exact match per seed, the mean,
pass@1 of each round's samples, DPO's val/drift/chosen, and the displacement
warnings.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import tempfile
import time

import torch
from bench_quality import last_value, pretrain, run_script
from helpers import format_table
from sum_task import write_sum_task
from word_task import write_jsonl, write_word_task

from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT
from nanobumble.evals.scoring import run_tasks
from nanobumble.evals.tasks import load_tasks
from nanobumble.inference.loading import load_model
from nanobumble.sample_pairs import make_checker

QUIET = ["--plot", "false", "--use_tensorboard", "false"]
TASKS = {"words": (write_word_task, "exact"), "sums": (write_sum_task, "number")}
# The rounds' settings, tuned on each task's dev prompts (README: "Preference pairs from the model's own answers")
_COMMON = {"rounds": 2, "prompts": 1000, "num_samples": 8, "temperature": 1.0, "finetuning_type": "lora",
           "lora_target_modules": "all", "pref_beta": 0.1, "sft_weight": 1.0, "num_epochs": 2.0}
ROUND_SETTINGS = {"words": {**_COMMON, "learning_rate": 3e-4}, "sums": {**_COMMON, "learning_rate": 1e-3}}


def score(model_path: str, task_file: str, checker: str, precision: torch.dtype) -> float:
    """Greedy answers on task_file's prompts through the chat template, checked as the samples are."""
    model, tokenizer, _, _ = load_model(model_path, "", torch.device("cpu"), precision)
    result = run_tasks(model, tokenizer, load_tasks([task_file]), torch.device("cpu"), precision,
                       batch_size=50, chat=True, max_new_tokens=24, system_prompt=DEFAULT_SYSTEM_PROMPT)[0]
    check = make_checker(checker)
    return sum(check(d["output"], d["answers"]) for d in result.details) / result.n


def write_data(root: str, task: str, seed: int, num_prompts: int, rounds: int) -> dict[str, str]:
    """The task's files, the held-out prompts split into dev and test, and the rounds' prompt pool
    (the fixed pairs' prompts with their right answers) as {"prompt", "answer"}."""
    write, _ = TASKS[task]
    paths = write(os.path.join(root, "data"), seed, 3000, max(3000, num_prompts * rounds), 400)
    with open(paths["held_out"], encoding="utf-8") as f:
        held_out = [json.loads(line) for line in f]
    paths["dev"], paths["test"] = (os.path.join(root, "data", f"{name}.jsonl") for name in ("dev", "test"))
    write_jsonl(paths["dev"], held_out[:200])
    write_jsonl(paths["test"], held_out[200:])
    with open(paths["dpo"], encoding="utf-8") as f:
        pool = [json.loads(line) for line in f]
    for r in range(rounds):
        paths[f"prompts{r + 1}"] = os.path.join(root, "data", f"prompts{r + 1}.jsonl")
        write_jsonl(paths[f"prompts{r + 1}"], [{"prompt": p["messages"][0]["content"], "answer": p["chosen"]}
                                               for p in pool[r * num_prompts:(r + 1) * num_prompts]])
    return paths


def run_module(module: str, args: list[str], log_path: str) -> tuple[float, str]:
    """python -m module args, as run_script runs a script; (seconds, its stderr+stdout)."""
    seconds = run_script("-m", [module, *args], log_path)
    with open(log_path) as log:
        return seconds, log.read()


def chosen_as_sft(pairs_path: str, out_path: str) -> int:
    """The chosen answers of a pairs file as SFT records (the control's data); how many."""
    records = []
    with open(pairs_path, encoding="utf-8") as f:
        for line in f:
            pair = json.loads(line)
            turns = [{"role": "user", "content": t["value"]} for t in pair["conversations"]]
            records.append({"messages": turns + [{"role": "assistant", "content": pair["chosen"]["value"]}]})
    write_jsonl(out_path, records)
    return len(records)


def one_seed(work_dir: str, base: str, task: str, seed: int, settings: dict, precision: str,
             control: bool = True, sft_from: str = "", name: str = "", dpo_args: list[str] = (),
             sample_args: list[str] = ()) -> dict:
    """SFT (or the SFT model of an earlier run in sft_from, for tuning the rounds), the rounds and the
    control of one seed, in work_dir/task/seed{seed}{name}."""
    root = os.path.join(work_dir, task, f"seed{seed}{name}")
    rounds = int(settings["rounds"])
    paths = write_data(root, task, seed, int(settings["prompts"]), rounds)
    checker = TASKS[task][1]
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    common = ["--seed", str(seed), "--cache_dir", os.path.join(work_dir, "cache"), "--overwrite_output_dir", "true",
              "--train_model_precision", precision] + QUIET
    row: dict = {"seed": seed, "pass1": [], "drift": [], "warned": 0, "dev": {}, "test": {}, "seconds": {}}

    def measure(name: str, model: str) -> None:
        row["dev"][name] = score(model, paths["dev"], checker, dtype)
        row["test"][name] = score(model, paths["test"], checker, dtype)
        print(f"  {task} seed {seed} {name}: dev {row['dev'][name]:.3f}, held-out {row['test'][name]:.3f}",
              flush=True)

    sft_dir = os.path.join(sft_from.format(seed=seed) if sft_from else root, "sft")
    if not sft_from:
        row["seconds"]["sft"] = run_script("train_sft.py", ["--model_name_or_path", base, "--dataset_path",
                                                             paths["sft"], "--output_dir", sft_dir] + common,
                                           os.path.join(root, "sft.log"))
    measure("sft", sft_dir)
    model, control_model = sft_dir, sft_dir
    lr, epochs = str(settings["learning_rate"]), str(settings["num_epochs"])
    lora = settings["finetuning_type"] == "lora"
    # the rounds and the control train the same parameters
    tuned = ["--finetuning_type", settings["finetuning_type"]] + \
        (["--lora_target_modules", settings["lora_target_modules"]] if lora else [])
    for r in range(1, rounds + 1):
        pairs = os.path.join(root, f"pairs{r}.jsonl")
        seconds, text = run_module("nanobumble.sample_pairs", [
            "--model_path", model, "--dataset_path", paths[f"prompts{r}"], "--output_path", pairs,
            "--num_samples", str(settings["num_samples"]), "--temperature", str(settings["temperature"]),
            "--max_new_tokens", "24", "--checker", checker, "--seed", str(seed * 100 + r), "--device", "cpu",
            "--precision", precision, *sample_args], os.path.join(root, f"sample{r}.log"))
        row["pass1"].append(float(text.split("pass@1 ")[-1].split(",")[0]))
        dpo_dir, merged = os.path.join(root, f"dpo{r}"), os.path.join(root, f"round{r}")
        start = time.time()
        run_script("train_dpo.py", ["--model_name_or_path", model, "--dataset_path", pairs, "--output_dir", dpo_dir,
                                    *tuned, "--learning_rate", lr, "--num_epochs", epochs,
                                    "--pref_beta", str(settings["pref_beta"]),
                                    "--sft_weight", str(settings["sft_weight"]), "--eval_tasks", paths["dev"]]
                   + common + list(dpo_args), os.path.join(root, f"dpo{r}.log"))
        if lora:
            run_module("nanobumble.merge_lora", ["--base_model_path", model, "--lora_model_path", dpo_dir,
                                                 "--save_path", merged, "--overwrite_output_dir", "true"],
                       os.path.join(root, f"merge{r}.log"))
        else:  # full fine-tuning: the run's output is the next model
            merged = dpo_dir
        row["seconds"][f"round{r}"] = seconds + time.time() - start
        row["drift"].append(last_value(dpo_dir, "val/drift/chosen"))
        with open(os.path.join(root, f"dpo{r}.log")) as log:
            row["warned"] += "likelihood displacement" in log.read()
        model = merged
        measure(f"round{r}", model)
        if control:
            data = os.path.join(root, f"control{r}_data.jsonl")
            chosen_as_sft(pairs, data)
            trained, merged = os.path.join(root, f"control{r}_trained"), os.path.join(root, f"control{r}")
            run_script("train_sft.py", ["--model_name_or_path", control_model, "--dataset_path", data,
                                        "--output_dir", trained, *tuned, "--learning_rate", lr, "--num_epochs", epochs,
                                        "--train_micro_batch_size_per_gpu", "4"] + common,
                       os.path.join(root, f"control{r}.log"))
            if lora:
                run_module("nanobumble.merge_lora", ["--base_model_path", control_model, "--lora_model_path",
                                                     trained, "--save_path", merged, "--overwrite_output_dir",
                                                     "true"], os.path.join(root, f"control_merge{r}.log"))
            else:
                merged = trained
            control_model = merged
            measure(f"control{r}", control_model)
    return row


def table(task: str, runs: list[dict], settings: dict, split: str) -> tuple[list, list]:
    rounds = int(settings["rounds"])
    names = ["sft"] + [f"round{r}" for r in range(1, rounds + 1)] + \
        [f"control{r}" for r in range(1, rounds + 1) if f"control{r}" in runs[0][split]]
    header = ["stage"] + [f"seed {r['seed']}" for r in runs] + ["mean", "vs SFT (min over seeds)", "pass@1 of samples"]
    rows = []
    for name in names:
        values = [r[split][name] for r in runs]
        gains = [r[split][name] - r[split]["sft"] for r in runs]
        pass1 = ""
        if name.startswith("round"):
            k = int(name[5:]) - 1
            pass1 = f"{statistics.mean(r['pass1'][k] for r in runs):.3f}"
        rows.append([name] + [f"{v:.3f}" for v in values] + [f"{statistics.mean(values):.3f}",
                     "" if name == "sft" else f"{statistics.mean(gains):+.3f} ({min(gains):+.3f})", pass1])
    return header, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="words")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
    parser.add_argument("--work_dir", default="", help="where the runs go (default: a temporary directory)")
    parser.add_argument("--pretrained", default="", help="start from this pretrained model instead of pretraining")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="every stage's")
    parser.add_argument("--no_control", action="store_true", help="skip the NLL-only control (tuning)")
    parser.add_argument("--sft_from", default="", help="tuning: take the SFT model of this earlier seed directory "
                        "({seed} in it: the seed's)")
    parser.add_argument("--name", default="", help="tuning: a suffix for the seed directory")
    parser.add_argument("--dpo_args", default="", help="extra train_dpo.py arguments (experiments)")
    parser.add_argument("--sample_args", default="", help="extra sample_pairs arguments (experiments)")
    parser.add_argument("--output", default="", help="also write the table to this file")
    for key, value in ROUND_SETTINGS["words"].items():
        parser.add_argument(f"--{key}", type=type(value), help="default: the task's in ROUND_SETTINGS")
    args = parser.parse_args(argv)
    settings = {key: value if getattr(args, key) is None else getattr(args, key)
                for key, value in ROUND_SETTINGS[args.task].items()}
    start = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        work_dir = args.work_dir or scratch
        base = args.pretrained or pretrain(work_dir, os.path.join(work_dir, "cache"))[0]
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            runs.append(one_seed(work_dir, base, args.task, seed, settings, args.precision, not args.no_control,
                                 args.sft_from, args.name, shlex.split(args.dpo_args), shlex.split(args.sample_args)))
            print(f"seed {seed}: {json.dumps(runs[-1])}", flush=True)
    title = (f"{args.task}: exact match on 200 held-out prompts ({args.precision}; settings "
             f"{' '.join(f'{k} {v}' for k, v in settings.items())}), {os.cpu_count()} CPU cores, "
             f"{(time.time() - start) / 60:.0f} min")
    text = format_table(title, *table(args.task, runs, settings, "test"))
    text += "\n" + format_table("the same on the 200 dev prompts (the settings were tuned on these)",
                                *table(args.task, runs, settings, "dev"))
    drifts = ", ".join(f"{d:.3f}" for r in runs for d in r["drift"])
    text += f"\nDPO val/drift/chosen per round: {drifts}; displacement warnings: {sum(r['warned'] for r in runs)}"
    print("\n" + text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
