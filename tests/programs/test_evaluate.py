"""nanobumble.evaluate: log-likelihood scoring against a float64 reference,
padding, few-shot prompts (exact match's too; none for bits per byte, and the
results say so), acc_norm, bits per byte against pretraining's val/bpb, exact
match, the command line, bad files and empty tasks; and (slow) the same numbers
as lm-evaluation-harness on the Hugging Face export."""

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from helpers import generate

import train_pretrain
from nanobumble.base.errors import ConfigError, DataError, UserError
from nanobumble.data.tokenizer import Tokenizer, train_tokenizer
from nanobumble.evals import scoring
from nanobumble.evals import tasks as task_files
from nanobumble.evaluate import main
from nanobumble.inference.generation import GenerationConfig
from nanobumble.inference.loading import load_model
from nanobumble.model.layers import IGNORE_INDEX
from nanobumble.model.lora import inject_lora
from nanobumble.model.transformer import ModelConfig, Transformer, pad_vocab_size
from nanobumble.store.adapter import adapter_config_for, save_adapter
from nanobumble.store.model_dir import load_model_dir, save_model_dir

REPO = REPO_ROOT
EVAL_DATA = os.path.join(REPO, "datasets", "eval")
MMLU_TEST = os.path.join(EVAL_DATA, "mmlu", "test", "elementary_science_test.csv")
CEVAL_VAL = os.path.join(EVAL_DATA, "ceval", "val", "bee_biology_val.csv")
CMMLU_TEST = os.path.join(EVAL_DATA, "cmmlu", "test", "daily_life.csv")
HELLASWAG = os.path.join(EVAL_DATA, "hellaswag_mini.jsonl")
TEXT = os.path.join(EVAL_DATA, "text_bpb.jsonl")
QA = os.path.join(EVAL_DATA, "qa_exact.jsonl")
CPU = torch.device("cpu")


def corpus() -> list[str]:
    """Every text of the example eval files, so the tokenizer knows their words."""
    texts = []
    for root, _, names in os.walk(EVAL_DATA):
        for name in names:
            if name.endswith((".csv", ".jsonl")):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    texts.append(f.read())
    return texts


def tiny_model(vocab_size: int, context: int = 512, scale: float = 8.0, tie: bool = True) -> Transformer:
    cfg = ModelConfig(vocab_size=pad_vocab_size(vocab_size), hidden_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=96, max_position_embeddings=context, tie_word_embeddings=tie)
    model = Transformer(cfg)
    with torch.no_grad():  # an untrained model whose choices differ from question to question
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model.eval()


@pytest.fixture(scope="module")
def qa(tmp_path_factory) -> str:
    """qa_exact.jsonl beside a dev split of its own, with answers the test knows."""
    root = tmp_path_factory.mktemp("qa")
    shutil.copy(QA, root / "qa_exact.jsonl")
    (root / "qa_exact_dev.jsonl").write_text('{"prompt": "What is 1 + 1?", "answer": ["2", "two"]}\n'
                                             '{"prompt": "蜜蜂有几条腿？", "answer": "6"}\n', encoding="utf-8")
    return str(root / "qa_exact.jsonl")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    tokenizer_file = train_tokenizer(corpus(), 700, str(root / "tokenizer.model"))
    tokenizer = Tokenizer(tokenizer_file)
    model = tiny_model(tokenizer.vocab_size)
    save_model_dir(str(root / "sft"), model, tokenizer_file, "stage: sft\n")
    return SimpleNamespace(root=root, tokenizer=tokenizer, model=model)


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """float64 log-softmax of the model's logits, summed over the continuation's tokens."""
    context_ids = tokenizer.encode(context)
    continuation_ids = tokenizer.encode(context + continuation)[len(context_ids):]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(ids)[0].double().log_softmax(-1)
    start = len(context_ids)
    return sum(logprobs[start - 1 + k, token].item() for k, token in enumerate(continuation_ids))


# --- scoring --------------------------------------------------------------------------------------

def test_letter_scores_match_a_float64_reference(setup):
    task = task_files.read_task(MMLU_TEST)
    result = scoring.choice_task(setup.model, setup.tokenizer, task, [], CPU, torch.float32, 3,
                                  scoring.ProgressLine(False))
    correct = 0
    for question, detail in zip(task.records, result.details):
        context = ("The following are multiple choice questions (with answers) about elementary science.\n\n"
                   f"{question.context}\nA. {question.options[0]}\nB. {question.options[1]}\n"
                   f"C. {question.options[2]}\nD. {question.options[3]}\nAnswer:")
        expected = [reference_loglikelihood(setup.model, setup.tokenizer, context, f" {letter}") for letter in "ABCD"]
        assert detail["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
        correct += max(range(4), key=expected.__getitem__) == question.gold
    assert result.metrics["acc"] == correct / len(task.records)
    assert len({d["predicted"] for d in result.details}) > 1  # the model's answers are not all the same letter


def test_padded_batches_give_the_same_loglikelihoods_as_one_at_a_time(setup):
    rows = []
    for length in (5, 40, 17, 3, 29, 40, 11):
        generator = torch.Generator().manual_seed(length)
        ids = torch.randint(4, setup.tokenizer.vocab_size, (length + 1,), generator=generator)
        targets = ids[1:].tolist()
        targets[:length // 2] = [IGNORE_INDEX] * (length // 2)
        rows.append((ids[:-1].tolist(), targets))
    batched = scoring.target_logprobs(setup.model, rows, CPU, torch.float32, batch_size=4)
    for row, logprobs in zip(rows, batched):
        alone = scoring.target_logprobs(setup.model, [row], CPU, torch.float32, batch_size=1)[0]
        assert logprobs.shape == (len(row[0]),)
        torch.testing.assert_close(logprobs, alone, atol=1e-5, rtol=0)
        assert (logprobs[torch.tensor(row[1]) == IGNORE_INDEX] == 0).all()


def test_a_space_ending_the_context_moves_to_the_continuation(setup):
    tokenizer = setup.tokenizer
    assert scoring.encode_pair(tokenizer, "Answer: ", "A") == scoring.encode_pair(tokenizer, "Answer:", " A")
    context_ids, continuation_ids = scoring.encode_pair(tokenizer, "Answer:", " B")
    assert context_ids == tokenizer.encode("Answer:")
    assert context_ids + continuation_ids == tokenizer.encode("Answer: B")


def test_a_long_context_is_cut_from_the_left():
    inputs, targets = scoring.scoring_row(list(range(10, 20)), [7, 8], max_len=6, where="f:1")
    assert inputs == [15, 16, 17, 18, 19, 7] and targets == [-100, -100, -100, -100, 7, 8]
    with pytest.raises(DataError, match="f:1: a continuation of 7 tokens"):
        scoring.scoring_row([1], list(range(7)), max_len=6, where="f:1")


def test_acc_norm_divides_by_the_length_of_the_ending_in_characters(monkeypatch, tmp_path):
    path = tmp_path / "cont.jsonl"
    records = [{"ctx": "one", "endings": ["ab", "abcdefgh"], "label": 1},  # raw picks 0, per character 1
               {"ctx": "two", "endings": ["蜜蜂", "ab"], "label": 0}]  # per character 1; per UTF-8 byte it would be 0
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    scores = [-2.0, -4.0, -3.0, -2.5]  # each row's continuation log-likelihood, in order

    def fake_logprobs(model, rows, *args, **kwargs):
        return [torch.tensor([0.0] * (len(row[0]) - 1) + [score], dtype=torch.float64)
                for row, score in zip(rows, scores)]

    monkeypatch.setattr(scoring, "target_logprobs", fake_logprobs)
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))
    tokenizer = SimpleNamespace(encode=lambda text: [ord(c) % 50 + 4 for c in text], eot_id=1)
    task = task_files.read_task(str(path))
    result = scoring.choice_task(model, tokenizer, task, [], CPU, torch.float32, 8, scoring.ProgressLine(False))
    assert task.kind == task_files.CONTINUATION
    assert [d["predicted"] for d in result.details] == [0, 1]
    assert result.metrics == {"acc": 0.0, "acc_norm": 0.5}  # question 1 right by acc_norm only


# --- few-shot prompts -----------------------------------------------------------------------------

def test_fewshot_examples_come_from_the_dev_split():
    for task_file, dev_file in ((MMLU_TEST, "mmlu/dev/elementary_science_dev.csv"),
                                (CEVAL_VAL, "ceval/dev/bee_biology_dev.csv"),
                                (CMMLU_TEST, "cmmlu/dev/daily_life.csv"),
                                (HELLASWAG, "hellaswag_mini_dev.jsonl")):
        task = task_files.read_task(task_file)
        shots = task_files.fewshot_examples(task, 2)
        assert shots == task_files.read_task(os.path.join(EVAL_DATA, dev_file)).records[:2]


def test_the_fewshot_prompt_is_description_solved_examples_then_the_question():
    task = task_files.read_task(MMLU_TEST)
    prompt = task_files.build_context(task, task.records[0], task_files.fewshot_examples(task, 2))
    assert prompt == (
        "The following are multiple choice questions (with answers) about elementary science.\n\n"
        "What do plants need to make their own food?\nA. Sunlight\nB. Sand\nC. Plastic\nD. Salt\nAnswer: A\n\n"
        "How many legs does an insect have?\nA. Four\nB. Six\nC. Eight\nD. Ten\nAnswer: B\n\n"
        "Which planet do we live on?\nA. Mars\nB. Earth\nC. Venus\nD. Jupiter\nAnswer:")
    task = task_files.read_task(HELLASWAG)
    prompt = task_files.build_context(task, task.records[0], task_files.fewshot_examples(task, 1))
    assert prompt == ("A man rinses a cup of rice and puts it in a pot with water. He covers the pot and cooks the "
                      "rice over low heat.\n\nA man fills a kettle with water and puts it on the stove. When the water "
                      "boils, he")


def test_a_sibling_dev_file_and_the_errors_when_there_is_none(tmp_path):
    (tmp_path / "bees_test.csv").write_text("Q1,a,b,c,d,A\n", encoding="utf-8")
    task = task_files.read_task(str(tmp_path / "bees_test.csv"))
    with pytest.raises(UserError, match=r"num_fewshot=1 needs its dev split; looked for .*bees_dev.csv"):
        task_files.fewshot_examples(task, 1)
    (tmp_path / "bees_dev.csv").write_text("D1,a,b,c,d,C\nD2,a,b,c,d,D\n", encoding="utf-8")
    assert [shot.context for shot in task_files.fewshot_examples(task, 2)] == ["D1", "D2"]
    with pytest.raises(DataError, match="bees_dev.csv: 2 examples, fewer than num_fewshot=3"):
        task_files.fewshot_examples(task, 3)
    assert task_files.fewshot_examples(task, 0) == []


def test_exact_match_puts_its_dev_examples_before_the_prompt(setup, qa, monkeypatch, tmp_path):
    (task, shots), = task_files.load_tasks([qa], 2)
    assert shots == [("What is 1 + 1?", ["2", "two"]), ("蜜蜂有几条腿？", ["6"])]
    seen = []  # the prompts the model is given

    def fake_generate(model, prompts, *args, **kwargs):
        seen.extend(setup.tokenizer.decode(prompt) for prompt in prompts)
        return [[setup.tokenizer.im_end_id] for _ in prompts]

    monkeypatch.setattr(scoring, "greedy_generate", fake_generate)
    chat, completion = (scoring.run_tasks(setup.model, setup.tokenizer, [(task, shots)], CPU, torch.float32,
                                          chat=chat, system_prompt="")[0] for chat in (True, False))
    assert chat.num_fewshot == completion.num_fewshot == 2
    first = task.records[0][0]
    assert seen[0] == (f"<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
                       f"<|im_start|>user\n蜜蜂有几条腿？<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n"
                       f"<|im_start|>user\n{first}<|im_end|>\n<|im_start|>assistant\n")
    assert seen[len(task.records)] == f"What is 1 + 1? 2\n\n蜜蜂有几条腿？ 6\n\n{first}"
    shutil.copy(QA, tmp_path / "qa_exact.jsonl")  # without its dev split
    with pytest.raises(UserError, match=r"num_fewshot=1 needs its dev split; looked for .*qa_exact_dev.jsonl"):
        task_files.load_tasks([str(tmp_path / "qa_exact.jsonl")], 1)  # none: an error, not a silent 0-shot


# --- file layouts ---------------------------------------------------------------------------------

def test_the_three_csv_layouts_and_the_jsonl_kinds():
    ceval, cmmlu, mmlu = (task_files.read_task(path) for path in (CEVAL_VAL, CMMLU_TEST, MMLU_TEST))
    assert (len(ceval.records), len(cmmlu.records), len(mmlu.records)) == (10, 8, 10)
    assert ceval.records[0] == task_files.Question("蜜蜂属于哪一类动物？", ["鸟类", "鱼类", "昆虫", "哺乳动物"], 2,
                                                 f"{CEVAL_VAL}:2")
    assert cmmlu.records[0].options == ["十二", "二十", "二十四", "三十"] and cmmlu.records[0].gold == 2
    assert mmlu.records[3].context == "Which animal is a mammal: a whale, a shark, a trout or a frog?"
    assert mmlu.records[3].where == f"{MMLU_TEST}:4"
    kinds = {path: task_files.read_task(path).kind for path in (HELLASWAG, TEXT, QA)}
    assert kinds == {HELLASWAG: "continuation", TEXT: "bpb", QA: "exact_match"}
    assert task_files.read_task(QA).records[-1] == ("What is 7 + 5?", ["12", "twelve"])


def test_directories_expand_to_their_task_files():
    files = task_files.expand_task_paths([os.path.join(EVAL_DATA, "ceval", "val"), QA])
    assert files == [CEVAL_VAL, QA]
    assert task_files.expand_task_paths(f"{CEVAL_VAL},{QA}") == [CEVAL_VAL, QA]
    assert task_files.expand_task_paths(EVAL_DATA) == [HELLASWAG, QA, TEXT]  # hellaswag_mini_dev.jsonl is left out


BAD_FILES = [
    ("bad.csv", "Q,a,b,c,d,A\nQ2,a,b,c,d,E\n", "bad.csv:2: answer 'E' is not one of A, B, C, D"),
    ("bad.csv", "Q,a,b,c,d,A\nQ2,a,b,c\n", "bad.csv:2: 4 columns, expected 6"),
    ("bad.csv", "question,options,answer\n", "bad.csv:1: expected a header naming question"),
    ("bad.csv", "id,question,A,B,C,D,answer\n1,Q,a,b,c,d,\n", "bad.csv:2: no answer"),
    ("bad.jsonl", '{"prompt": "p", "answer": "a"}\n{"prompt": "p"\n', "bad.jsonl:2: malformed JSON"),
    ("bad.jsonl", '{"input": "x"}\n', "bad.jsonl:1: cannot tell the task from the keys"),
    ("bad.jsonl", '{"text": "a"}\n\n{"text": 3.5, "x": 1}\n', ""),  # numbers are text: no error
    ("bad.jsonl", '{"text": "a"}\n{"text": null}\n', 'bad.jsonl:2: "text" must be a string'),
    ("bad.jsonl", '{"ctx": "c", "endings": ["a", "b"], "label": 2}\n', "bad.jsonl:1: answer 2 is not one of A, B"),
    ("bad.jsonl", '{"text": "a"}\n[1]\n', "bad.jsonl:2: expected a JSON object"),
    ("bad.jsonl", "", "bad.jsonl: no records"),
    ("bad.jsonl", '{"text": ""}\n\n{"text": ""}\n', "bad.jsonl: every text is empty"),  # bpb would be 0.0000
    ("bad.jsonl", '{"text": ""}\n{"text": " "}\n', ""),  # one byte to score
]


@pytest.mark.parametrize("name,content,message", BAD_FILES)
def test_a_bad_file_is_named_with_its_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    if not message:
        task_files.read_task(str(path))
        return
    with pytest.raises(DataError) as error:
        task_files.read_task(str(path))
    assert message in str(error.value)


def test_bytes_that_are_not_utf8_are_named_with_their_line(tmp_path):
    (tmp_path / "bad.csv").write_bytes(b"Q,a,b,c,d,A\nQ\xff,a,b,c,d,B\n")
    with pytest.raises(DataError, match=r"bad.csv:2: not UTF-8 text"):
        task_files.read_task(str(tmp_path / "bad.csv"))


# --- bits per byte --------------------------------------------------------------------------------

def test_bpb_is_pretrainings_val_bpb_on_the_same_text(setup, tmp_path):
    texts = [json.loads(line)["text"] for line in open(TEXT, encoding="utf-8")]
    ours = scoring.evaluate_tasks(setup.model, setup.tokenizer, task_files.load_tasks([TEXT]), CPU, torch.float32,
                                   batch_size=4)

    # Pretraining's evaluate() on the same documents, one unpadded row each, laid out as
    # in its token shards: <|endoftext|> (the end of the document before) text <|endoftext|>.
    eot = setup.tokenizer.eot_id
    sequences = [torch.tensor([eot] + setup.tokenizer.encode(text) + [eot]) for text in texts]
    val_data = SimpleNamespace(val_batches=lambda *args: [(s[None, :-1], s[None, 1:]) for s in sequences])
    cfg = SimpleNamespace(cutoff_len=512, train_micro_batch_size_per_gpu=1, eval_rows=None)
    info = SimpleNamespace(rank=0, world_size=1, device=CPU)
    token_bytes = torch.from_numpy(setup.tokenizer.token_byte_lengths())
    token_bytes = F.pad(token_bytes, (0, setup.model.config.vocab_size - len(token_bytes)))
    expected = train_pretrain.evaluate(setup.model, val_data, cfg, token_bytes, info, torch.float32)["val/bpb"]
    assert ours == {"eval/text_bpb/bpb": pytest.approx(expected, rel=1e-6)}
    setup.model.eval()  # pretraining's evaluate() leaves it in train mode


def test_a_document_longer_than_the_context_is_scored_in_windows(setup, tmp_path):
    text = " ".join(json.loads(line)["text"] for line in open(TEXT, encoding="utf-8"))
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    ids = [setup.tokenizer.eot_id] + setup.tokenizer.encode(text) + [setup.tokenizer.eot_id]
    model = tiny_model(setup.tokenizer.vocab_size, context=64)
    assert len(ids) > 3 * 64
    bits = total_bytes = 0.0
    token_bytes = setup.tokenizer.token_byte_lengths()
    for start in range(0, len(ids) - 1, 64):  # every token a target once, each window from scratch
        window = torch.tensor(ids[start:start + 65])
        with torch.no_grad():
            logprobs = model(window[None, :-1])[0].double().log_softmax(-1)
        for position, target in enumerate(window[1:].tolist()):
            if token_bytes[target]:
                bits -= logprobs[position, target].item() / math.log(2)
                total_bytes += token_bytes[target]
    result = scoring.evaluate_tasks(model, setup.tokenizer, task_files.load_tasks([str(tmp_path / "long.jsonl")]), CPU,
                                     torch.float32)
    assert result["eval/long/bpb"] == pytest.approx(bits / total_bytes, rel=1e-6)


# --- exact match ----------------------------------------------------------------------------------

def test_exact_match_normalisation():
    normalize = scoring.normalize_answer
    assert normalize("  Eltsac \n") == normalize("eltsac") == "eltsac"
    assert normalize("flower \t  flower") == "flower flower"
    assert normalize("ＡＢＣ　１２") == "abc 12"  # full-width letters, digits and space (NFKC)
    assert normalize("Straße") == normalize("STRASSE")  # casefold, not just lower
    assert normalize("59.") != normalize("59")  # punctuation is kept


def test_batched_greedy_generation_matches_generate_one_at_a_time(setup):
    prompts = [setup.tokenizer.encode(text) for text in ("Bees live in", "计算：18 + 41", "A man fills a kettle")]
    outputs = scoring.greedy_generate(setup.model, prompts, 5, CPU, torch.float32, batch_size=3,
                                       vocab_size=setup.tokenizer.vocab_size, finished=lambda ids: False)
    for prompt, output in zip(prompts, outputs):
        expected = generate(setup.model, prompt, GenerationConfig(max_new_tokens=5, do_sample=False,
                                                                  repetition_penalty=1.0),
                            stop_ids=(), vocab_size=setup.tokenizer.vocab_size)
        assert output == expected


def test_exact_match_compares_the_first_line_of_a_base_models_answer(setup, monkeypatch, tmp_path):
    tokenizer = setup.tokenizer
    answers = {"2 + 2 =": " 4\nand more", "Say hi:": "hi there<|im_end|>", "Name:": "\n\nBee"}

    def fake_generate(model, prompts, max_new_tokens, device, dtype, batch_size, vocab_size, finished, progress):
        texts = [answers[tokenizer.decode(prompt)] for prompt in prompts]
        return [tokenizer.encode(t.replace("<|im_end|>", "")) + ([tokenizer.im_end_id] if "<|im_end|>" in t else [])
                for t in texts]

    monkeypatch.setattr(scoring, "greedy_generate", fake_generate)
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                            for p, a in (("2 + 2 =", "4"), ("Say hi:", "HI  THERE"), ("Name:", ["bee", "wasp"]))))
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))
    result = scoring.exact_match_task(model, tokenizer, task_files.read_task(str(path)), False, "", 8, CPU,
                                       torch.float32, 8, scoring.ProgressLine(False))
    assert [d["output"] for d in result.details] == ["4", "hi there", "Bee"]
    assert result.metrics == {"exact_match": 1.0}


def test_evaluate_tasks_returns_every_metric_and_restores_the_mode(setup):
    model = setup.model
    model.train()
    metrics = scoring.evaluate_tasks(model, setup.tokenizer, task_files.load_tasks([CEVAL_VAL, HELLASWAG, TEXT], 1),
                                      CPU, torch.float32, batch_size=16)
    assert model.training
    model.eval()
    assert sorted(metrics) == ["eval/bee_biology_val/acc", "eval/hellaswag_mini/acc", "eval/hellaswag_mini/acc_norm",
                               "eval/text_bpb/bpb"]
    assert all(0 <= value <= 1 for key, value in metrics.items() if "acc" in key)


# --- the command line -----------------------------------------------------------------------------

def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanobumble.evaluate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_the_command_line_prints_the_table_and_writes_the_json(setup, qa, tmp_path):
    model_dir = str(setup.root / "sft")
    tasks = [os.path.join(EVAL_DATA, "ceval", "val"), MMLU_TEST, HELLASWAG, TEXT, qa]
    result = run_cli(["--model_path", model_dir, "--tasks", *tasks, "--num_fewshot", "1", "--max_new_tokens", "3",
                      "--batch_size", "16", "--precision", "fp32"])  # compared with fp32 below (auto: bf16 on AMX)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["task", "type", "n", "acc", "acc_norm", "bpb", "exact_match"]
    names = [line.split()[0] for line in lines[2:]]
    assert names == ["bee_biology_val", "elementary_science_test", "hellaswag_mini", "text_bpb", "qa_exact", "overall"]
    assert lines[-1].split()[:4] == ["overall", "all", "questions", "30"]
    assert "exact match in chat mode" in result.stderr and "qa_exact: prompts: 10/10" in result.stderr
    assert "5 task files, 1-shot (bits per byte: 0-shot)," in result.stderr  # as many as were used

    report = json.load(open(os.path.join(model_dir, "eval_results.json"), encoding="utf-8"))
    assert report["config"]["mode"] == "chat" and report["config"]["limit"] is None
    assert report["groups"]["overall"]["sample_len"] == 30
    assert report["group_subtasks"]["overall"] == ["bee_biology_val", "elementary_science_test", "hellaswag_mini"]
    assert report["results"]["bee_biology_val"]["sample_len"] == 10 and len(report["samples"]["qa_exact"]) == 10
    assert report["n-shot"] == {
        "bee_biology_val": 1, "elementary_science_test": 1, "hellaswag_mini": 1, "text_bpb": 0, "qa_exact": 1}
    assert report["n-samples"]["hellaswag_mini"] == {"original": 10, "effective": 10}
    assert report["higher_is_better"]["text_bpb"] == {"bpb": False}
    in_process = scoring.evaluate_tasks(setup.model, setup.tokenizer, task_files.load_tasks([CEVAL_VAL, HELLASWAG], 1),
                                         CPU, torch.float32)
    for key, value in in_process.items():
        _, task, metric = key.split("/")
        assert report["results"][task][f"{metric},none"] == pytest.approx(value, abs=1e-12)
    # every mean with lm-evaluation-harness's standard error of its per-item values, in the table too
    from lm_eval.api.metrics import mean_stderr
    table = {line.split()[0]: line for line in lines[2:]}
    for task, metric in (("bee_biology_val", "acc"), ("hellaswag_mini", "acc_norm"), ("qa_exact", "exact_match")):
        stderr = report["results"][task][f"{metric}_stderr,none"]
        assert stderr == pytest.approx(mean_stderr([item[metric] for item in report["samples"][task]]), rel=1e-12)
        assert f"{report['results'][task][f'{metric},none']:.4f} ± {stderr:.4f}" in table[task]
    assert report["results"]["text_bpb"]["bpb_stderr,none"] == "N/A"  # a ratio of sums, not a mean of items


def test_limit_counts_items_as_lm_evaluation_harness_does():
    from lm_eval.evaluator_utils import get_sample_size

    for total in (1, 7, 10):
        for limit in (0.1, 0.25, 0.5, 0.99, 1, 3, 10, 50):
            assert task_files.limit_count(limit, total) == min(total, get_sample_size(
                SimpleNamespace(eval_docs=range(total)), limit)), (limit, total)
        assert task_files.limit_count(0, total) == total  # 0: no limit


def test_the_standard_error_is_lm_evaluation_harness_mean_stderr():
    from lm_eval.api.metrics import mean_stderr

    generator = torch.Generator().manual_seed(0)
    for n in (2, 3, 10, 101):
        values = (torch.rand(n, generator=generator) < 0.4).double().tolist()
        assert scoring.mean_stderr(values) == pytest.approx(mean_stderr(values), rel=1e-12)
    assert scoring.mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(math.sqrt(0.25 / 4))  # s^2 = 0.75/3
    assert scoring.mean_stderr([1.0]) == "N/A"  # as lm-evaluation-harness writes for a single item


def test_limit_scores_the_first_items_of_each_task_and_says_so(setup, qa, tmp_path, capsys):
    output = tmp_path / "results.json"
    main(["--model_path", str(setup.root / "sft"), "--tasks", CEVAL_VAL, HELLASWAG, "--limit", "0.5",
          "--output", str(output), "--precision", "fp32"])  # compared with fp32 below (auto: bf16 on AMX)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "limit: 0.5 (the first 50% (rounded up) of each task: not the full benchmark)"
    assert [line.split()[2] for line in lines[3:5]] == ["5/10", "5/10"]
    report = json.loads(output.read_text(encoding="utf-8"))
    assert report["config"]["limit"] == 0.5
    assert report["n-samples"] == {"bee_biology_val": {"original": 10, "effective": 5},
                                   "hellaswag_mini": {"original": 10, "effective": 5}}
    full = {r.name: r for r in scoring.run_tasks(setup.model, setup.tokenizer, task_files.load_tasks(
        [CEVAL_VAL, HELLASWAG]), CPU, torch.float32)}
    for name, count in (("bee_biology_val", 5), ("hellaswag_mini", 5)):
        assert len(report["samples"][name]) == count
        for limited, every in zip(report["samples"][name], full[name].details):
            assert limited["loglikelihoods"] == pytest.approx(every["loglikelihoods"], abs=1e-5)  # other batches
        assert report["results"][name]["acc,none"] == sum(d["acc"] for d in full[name].details[:count]) / count
    main(["--model_path", str(setup.root / "sft"), "--tasks", QA, "--limit", "2", "--output", str(output),
          "--max_new_tokens", "2"])
    assert json.loads(output.read_text(encoding="utf-8"))["n-samples"] == {"qa_exact": {"original": 10,
                                                                                         "effective": 2}}


def test_a_lora_run_directory_loads_its_base_model_and_adapter(setup, tmp_path):
    model, _ = load_model_dir(str(setup.root / "sft"))
    inject_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    save_adapter(str(tmp_path / "dpo"), model, adapter_config_for(model, str(setup.root / "sft")))
    loaded, _, model_path, adapter_path = load_model(str(tmp_path / "dpo"), "", CPU, torch.float32)
    assert (model_path, adapter_path) == (str(setup.root / "sft"), str(tmp_path / "dpo"))
    ids = torch.tensor([setup.tokenizer.encode("Bees live in a hive.")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model.eval()(ids))


@pytest.mark.parametrize("argv,message", [
    (["--tasks", CEVAL_VAL], "key 'model_path' is required"),
    (["--model_path", "m"], "key 'tasks' is required"),
    (["--model_path", "m", "--tasks", "--num_fewshot", "1"], "key 'tasks' expects one or more values"),
    (["--model_path", "m", "--tasks", CEVAL_VAL, "--batch_size", "0"], "key 'batch_size' must be at least 1, got 0"),
    (["--model_path", "m", "--tasks", CEVAL_VAL, "--max_new_tokens", "x"], "key 'max_new_tokens' expects int"),
    (["--model_path", "m", "--tasks", CEVAL_VAL, "--num_fewshot", "-1"], "key 'num_fewshot' must be >= 0"),
    (["--model_path", "m", "--tasks", CEVAL_VAL, "--mode", "raw"], "key 'mode' must be one of auto, chat"),
    (["--model_path", "m", "--task", CEVAL_VAL, MMLU_TEST], "unknown key 'task'; did you mean tasks?"),
    (["--model_path", "m", CEVAL_VAL], f"expected --key value, got {CEVAL_VAL!r}"),
    (["--model_path", "m", "--tasks", CEVAL_VAL, "--limit", "2.5"], "key 'limit' must be a whole number"),
    (["--model_path", "m", "--tasks", CEVAL_VAL, "--limit", "-1"], "key 'limit' must be"),
])
def test_bad_arguments_are_a_config_error_naming_the_key(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):  # run_cli: one line, exit code 2
        main(argv)


def test_an_output_that_is_a_directory_is_one_line_before_the_model_loads(monkeypatch, capsys, tmp_path):
    from nanobumble import evaluate

    def load_model(*args):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(evaluate, "load_model", load_model)
    monkeypatch.setattr(sys, "argv", ["evaluate", "--model_path", "m", "--tasks", QA, "--output", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        evaluate.run_cli(evaluate.main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --output {tmp_path}: is a directory; expected the results file's name"]


def test_a_bad_task_file_exits_2_naming_file_and_line(setup, tmp_path):
    shutil.copy(MMLU_TEST, tmp_path / "science_test.csv")
    with open(tmp_path / "science_test.csv", "a", encoding="utf-8") as f:
        f.write("What colour is the sky?,Blue,Green,Red,Black,F\n")
    result = run_cli(["--model_path", str(setup.root / "sft"), "--tasks", str(tmp_path / "science_test.csv"),
                      "--output", str(tmp_path / "results.json")])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'science_test.csv'}:11: answer 'F' is not one of A, B, C, D (or 0-3)"
    assert not (tmp_path / "results.json").exists()


# --- against lm-evaluation-harness ----------------------------------------------------------------

@pytest.mark.slow
def test_the_same_loglikelihoods_and_accuracy_as_lm_evaluation_harness(setup, tmp_path, monkeypatch):
    """lm_eval's HFLM on the Hugging Face export of the model, with local task configs
    that ask what nanobumble asks: C-Eval 2-shot letters, and HellaSwag endings."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM

    from nanobumble.export_hf import export_hf

    started = time.time()
    model = tiny_model(setup.tokenizer.vocab_size, tie=False)
    save_model_dir(str(tmp_path / "model"), model, setup.tokenizer.model_file, "stage: sft\n")
    export_hf(str(tmp_path / "model"), str(tmp_path / "hf"))
    model, _ = load_model_dir(str(tmp_path / "model"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32)
    hf_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "hf"))
    lm = HFLM(pretrained=hf_model.eval(), tokenizer=hf_tokenizer, batch_size=8, max_length=512)

    ceval_dev = str(tmp_path / "bee_biology_dev.csv")  # the HF csv loader wants val's columns: no explanation
    with open(os.path.join(EVAL_DATA, "ceval", "dev", "bee_biology_dev.csv"), encoding="utf-8") as f:
        rows = [row[:7] for row in csv.reader(f)]
    with open(ceval_dev, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    letters = {
        "task": "nb_ceval", "dataset_path": "csv",
        "dataset_kwargs": {"data_files": {"val": CEVAL_VAL, "dev": ceval_dev}},
        "test_split": "val", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"}, "num_fewshot": 2,
        "output_type": "multiple_choice",
        "description": "The following are multiple choice questions (with answers) about bee biology.\n\n",
        "doc_to_text": "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
        "metric_list": [{"metric": "acc"}]}
    endings = {
        "task": "nb_hellaswag", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": HELLASWAG}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{ctx}}", "doc_to_choice": "endings",
        "doc_to_target": "label", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    theirs = lm_eval.simple_evaluate(model=lm, tasks=[letters, endings], log_samples=True, bootstrap_iters=0)

    tasks = task_files.load_tasks([CEVAL_VAL], num_fewshot=2) + task_files.load_tasks([HELLASWAG])
    ours = {r.name: r for r in scoring.run_tasks(model, setup.tokenizer, tasks, CPU, torch.float32)}
    largest_difference = 0.0
    for task, name in (("nb_ceval", "bee_biology_val"), ("nb_hellaswag", "hellaswag_mini")):
        samples = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        for sample, detail in zip(samples, ours[name].details, strict=True):
            their_loglikelihoods = [response[0] for response in sample["filtered_resps"]]
            assert detail["loglikelihoods"] == pytest.approx(their_loglikelihoods, abs=1e-4)
            largest_difference = max(largest_difference, *(abs(a - b) for a, b in
                                                           zip(detail["loglikelihoods"], their_loglikelihoods)))
        for metric, value in ours[name].metrics.items():
            assert theirs["results"][task][f"{metric},none"] == value, (task, metric)
    accuracies = [ours["bee_biology_val"].metrics["acc"], *ours["hellaswag_mini"].metrics.values()]
    assert len(set(d["predicted"] for d in ours["bee_biology_val"].details)) > 1, accuracies
    print(f"\nlm_eval cross-check: {time.time() - started:.1f}s, accuracies {accuracies}, "
          f"largest log-likelihood difference {largest_difference:.1e}")


def write_lm_eval_tasks(directory) -> None:
    """lm_eval task configs (YAML, for --include_path) that ask what nanobumble asks at
    --num_fewshot 2: C-Eval letters with its dev split's first examples, HellaSwag endings."""
    import yaml

    directory.mkdir()
    ceval_dev = str(directory / "bee_biology_dev.csv")  # the HF csv loader wants val's columns: no explanation
    with open(os.path.join(EVAL_DATA, "ceval", "dev", "bee_biology_dev.csv"), encoding="utf-8") as f:
        rows = [row[:7] for row in csv.reader(f)]
    with open(ceval_dev, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    first_two = {"num_fewshot": 2, "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"}}
    letters = {
        "task": "nb_ceval", "dataset_path": "csv",
        "dataset_kwargs": {"data_files": {"val": CEVAL_VAL, "dev": ceval_dev}}, "test_split": "val",
        **first_two, "output_type": "multiple_choice",
        "description": "The following are multiple choice questions (with answers) about bee biology.\n\n",
        "doc_to_text": "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
        "metric_list": [{"metric": "acc"}]}
    hellaswag_dev = os.path.join(EVAL_DATA, "hellaswag_mini_dev.jsonl")
    endings = {
        "task": "nb_hellaswag", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": HELLASWAG, "dev": hellaswag_dev}}, "test_split": "test",
        **first_two, "output_type": "multiple_choice", "doc_to_text": "{{ctx}}", "doc_to_choice": "endings",
        "doc_to_target": "label", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    for config in (letters, endings):
        (directory / f"{config['task']}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")


@pytest.mark.slow
def test_the_lm_eval_command_line_on_the_export_gives_the_same_loglikelihoods_and_stderr(setup, tmp_path):
    """`python -m lm_eval --model hf` on the Hugging Face export (its own AutoTokenizer, so the
    export must give it nanobumble's ids), offline, against `python -m nanobumble.evaluate`
    on the model it was exported from, both with --limit 7 and 2-shot."""
    from nanobumble.export_hf import export_hf

    started = time.time()
    model = tiny_model(setup.tokenizer.vocab_size, tie=False)
    save_model_dir(str(tmp_path / "model"), model, setup.tokenizer.model_file, "stage: sft\n")
    export_hf(str(tmp_path / "model"), str(tmp_path / "hf"))
    write_lm_eval_tasks(tmp_path / "tasks")
    offline = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache")}
    theirs = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf",
         "--model_args", f"pretrained={tmp_path / 'hf'},dtype=float32", "--tasks", "nb_ceval,nb_hellaswag",
         "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
         "--batch_size", "8", "--limit", "7", "--log_samples", "--output_path", str(tmp_path / "lm_eval")],
        cwd=tmp_path, env=offline, capture_output=True, text=True, timeout=600)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    (results_file,) = (tmp_path / "lm_eval").glob("*/results_*.json")
    report = json.loads(results_file.read_text(encoding="utf-8"))

    result = run_cli(["--model_path", str(tmp_path / "model"), "--tasks", CEVAL_VAL, HELLASWAG, "--num_fewshot", "2",
                      "--limit", "7", "--device", "cpu", "--output", str(tmp_path / "ours.json")])
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads((tmp_path / "ours.json").read_text(encoding="utf-8"))

    largest_difference = 0.0
    for task, name in (("nb_ceval", "bee_biology_val"), ("nb_hellaswag", "hellaswag_mini")):
        (samples_file,) = results_file.parent.glob(f"samples_{task}_*.jsonl")
        samples = sorted((json.loads(line) for line in samples_file.read_text(encoding="utf-8").splitlines()),
                         key=lambda sample: sample["doc_id"])
        assert [s["doc_id"] for s in samples] == [d["doc_id"] for d in ours["samples"][name]] == list(range(7))
        for sample, item in zip(samples, ours["samples"][name], strict=True):
            # the samples file writes each (log-likelihood, is greedy) as strings
            their_loglikelihoods = [float(response[0]) for response in sample["filtered_resps"]]
            assert item["loglikelihoods"] == pytest.approx(their_loglikelihoods, abs=1e-4), (task, sample["doc_id"])
            largest_difference = max(largest_difference, *(abs(a - b) for a, b in
                                                           zip(item["loglikelihoods"], their_loglikelihoods)))
            assert item["predicted"] == max(range(len(their_loglikelihoods)), key=their_loglikelihoods.__getitem__)
            assert item["acc"] == sample["acc"]
        for metric in ("acc", "acc_norm") if task == "nb_hellaswag" else ("acc",):
            for key in (f"{metric},none", f"{metric}_stderr,none"):
                assert ours["results"][name][key] == pytest.approx(report["results"][task][key], rel=1e-12), key
        assert ours["n-samples"][name] == report["n-samples"][task] == {"original": 10, "effective": 7}
        assert ours["n-shot"][name] == report["n-shot"][task] == 2
    predicted = {d["predicted"] for d in ours["samples"]["bee_biology_val"]}
    assert len(predicted) > 1, predicted  # not one letter for every question
    print(f"\nlm_eval command line cross-check: {time.time() - started:.1f}s, largest log-likelihood difference "
          f"{largest_difference:.1e}, acc {ours['results']['bee_biology_val']['acc,none']:.4f} ± "
          f"{ours['results']['bee_biology_val']['acc_stderr,none']:.4f}")


FSDP_SCRIPT = """
import json, sys
import torch
from nanobumble.run.build import build_model
from nanobumble.base.distributed import distributed_run
from nanobumble.evals.scoring import evaluate_tasks
from nanobumble.evals.tasks import load_tasks
from nanobumble.store.model_dir import load_model_config
from nanobumble.data.tokenizer import load_tokenizer
model_dir, tasks, out = sys.argv[1:4]
with distributed_run(5) as info:
    model = build_model(load_model_config(model_dir + "/config.json"), info, 0, model_dir, None)
    metrics = evaluate_tasks(model, load_tokenizer(model_dir), load_tasks(tasks, 1), info.device, torch.float32,
                             batch_size=3, max_new_tokens=4)
    with open(f"{out}.{info.rank}.json", "w") as f:
        json.dump(metrics, f)
"""


@pytest.mark.slow
def test_two_fsdp_ranks_run_the_same_forwards_and_get_one_processs_numbers(setup, qa, tmp_path):
    """Every forward of a sharded model is a collective: a rank that ran one more or
    one fewer (batching, generation length) would hang; gloo times out after 5 min."""
    script = tmp_path / "evaluate_sharded.py"
    script.write_text(FSDP_SCRIPT)
    tasks = ",".join([CEVAL_VAL, HELLASWAG, TEXT, qa])
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(setup.root / "sft"), tasks, str(tmp_path / "metrics")], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"metrics.{rank}.json")) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    one = scoring.evaluate_tasks(setup.model, setup.tokenizer, task_files.load_tasks(tasks, 1), CPU, torch.float32,
                                  batch_size=3, max_new_tokens=4)
    assert ranks[0] == pytest.approx(one, rel=1e-6)


def test_a_hugging_face_qwen2_directory_is_evaluated(tmp_path):
    from hf_qwen2 import make_qwen2_dir, tokenizer_texts

    qwen = make_qwen2_dir(str(tmp_path / "qwen"), tokenizer_texts())
    result = run_cli(["--model_path", qwen, "--tasks", HELLASWAG, QA, "--output", str(tmp_path / "out.json")])
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    assert {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"} <= set(results["hellaswag_mini"])
    assert {"exact_match,none", "exact_match_stderr,none"} <= set(results["qa_exact"])
