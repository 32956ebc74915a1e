"""nanobumble.sample_pairs: the checkers against hand-worked cases, the pair rules,
the written pairs read back by DPO's reader with the prompt the samples came from,
the samples equal to the batched decoder's at their seeds (whatever the batch), and
bad input."""

import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO_ROOT

from nanobumble.base.errors import ConfigError, DataError, UserError
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT, render
from nanobumble.data.dpo_data import load_preference_pairs, tokenize_pairs
from nanobumble.data.tokenizer import Tokenizer, train_tokenizer
from nanobumble.inference.batching import generate_batch
from nanobumble.inference.generation import GenerationConfig
from nanobumble.model.transformer import ModelConfig, Transformer, pad_vocab_size
from nanobumble.sample_pairs import (
    build_pairs,
    is_pairs_file,
    last_number,
    load_prompts,
    main,
    make_checker,
    pair_record,
    sample_seed,
)
from nanobumble.store.model_dir import save_model_dir

# --- checkers --------------------------------------------------------------------------------------

CASES = [
    # checker, pattern, answer, references, correct
    ("exact", "", " dbac\n", ["dbac"], True),
    ("exact", "", "DBAC", ["dbac"], False),  # case counts
    ("exact", "", "db ac", ["dbac"], False),
    ("exact", "", "two", ["2", "two"], True),  # any accepted answer
    ("normalized", "", "  The  Answer\tIs ", ["the answer is"], True),
    ("normalized", "", "ＡＢＣ", ["abc"], True),  # NFKC: full-width letters
    ("normalized", "", "the answers", ["the answer"], False),
    ("contains", "", "I think it is Paris, France.", ["paris"], True),
    ("contains", "", "Lyon", ["Paris"], False),
    ("number", "", "so the total is 1,234 apples", ["1234"], True),
    ("number", "", "42.0", ["The answer is 42"], True),
    ("number", "", "3 + 4 = 7", ["7"], True),  # the last number
    ("number", "", "7 is 3 + 4", ["7"], False),
    ("number", "", "-5", ["5"], False),
    ("number", "", "no number here", ["0"], False),
    ("number", "", "12", ["no number"], False),
    ("regex", r"#### (-?[0-9.,]+)", "work... #### 18", ["Janet sells... #### 18"], True),
    ("regex", r"#### (-?[0-9.,]+)", "work... #### 17", ["Janet sells... #### 18"], False),
    ("regex", r"#### (-?[0-9.,]+)", "18", ["Janet sells... #### 18"], False),  # no match in the answer
    ("regex", r"answer: (\w+)", "the answer: blue", ["blue"], True),  # the reference as it is when unmatched
    ("regex", r"[A-D]", "(C) because", ["C"], True),  # no group: the whole match
]


@pytest.mark.parametrize("checker,pattern,answer,references,correct", CASES)
def test_checkers_on_hand_worked_cases(checker, pattern, answer, references, correct):
    assert make_checker(checker, pattern)(answer, references) is correct


def test_last_number_reads_signs_commas_and_decimals():
    assert [last_number(t) for t in ("x -3.5 y", "1,000,000", "v2 then .5", "none", "1.")] == \
        [-3.5, 1e6, 0.5, None, 1.0]


# --- pairs -----------------------------------------------------------------------------------------

ITEM = {"prompt": [{"role": "user", "content": "reverse: abc"}], "references": ["cba"], "where": "p.jsonl:3"}
EXACT = make_checker("exact")


def test_a_pair_is_a_correct_sample_against_an_incorrect_one():
    samples = [("cba", True), ("abc", True), ("cba", True), ("CBA", True)]
    correct, pairs = build_pairs(ITEM, samples, EXACT, 1, random.Random(0))
    assert correct == 2
    assert len(pairs) == 1 and pairs[0][0] == "cba" and pairs[0][1] in ("abc", "CBA") and pairs[0][2] == "sample"


def test_pairs_per_prompt_uses_distinct_texts_first_and_never_repeats_a_pair():
    samples = [("cba", True), ("abc", True), ("bca", True), ("abc", True)]
    _, pairs = build_pairs(ITEM, samples, EXACT, 5, random.Random(1))
    assert sorted(p[1] for p in pairs) == ["abc", "bca"]  # one chosen text, two distinct rejected ones
    assert len(set(pairs)) == len(pairs)


def test_likelihood_puts_the_most_likely_incorrect_text_first():
    samples = [("cba", True), ("abc", True), ("bca", True), ("acb", True)]
    scores = {"abc": -3.0, "bca": -1.0, "acb": -2.0}
    _, pairs = build_pairs(ITEM, samples, EXACT, 3, random.Random(0), lambda texts: [scores[t] for t in texts])
    assert [p[1] for p in pairs] == ["bca", "acb", "abc"]


def test_no_correct_sample_takes_the_reference_and_all_correct_gives_no_pair():
    _, pairs = build_pairs(ITEM, [("abc", True), ("ab", True)], EXACT, 1, random.Random(0))
    assert pairs[0][0] == "cba" and pairs[0][2] == "reference"
    assert build_pairs(ITEM, [("cba", True), ("cba", True)], EXACT, 1, random.Random(0)) == (2, [])


def test_an_answer_that_did_not_end_is_never_correct_nor_rejected_against_its_own_text():
    correct, pairs = build_pairs(ITEM, [("cba", False), ("abc", True)], EXACT, 2, random.Random(0))
    assert correct == 0
    assert pairs == [("cba", "abc", "reference")]  # (cba, cba) would be one text twice


# --- the written pairs, read back as DPO reads them ------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_pairs")
    words = ["reverse", "sort", "upper", "abc", "cab", "bca", "the answer is", "hello world", "e", "be", "see"]
    tokenizer_file = train_tokenizer([" ".join(words * 20), "some more text to learn from"] * 5, 320,
                                     str(root / "tokenizer.model"))
    tokenizer = Tokenizer(tokenizer_file)
    cfg = ModelConfig(vocab_size=pad_vocab_size(tokenizer.vocab_size), hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # every position: logit 5 for <|im_end|> and "e", 0 for the rest, so samples
        for layer in model.layers:  # end or not, and hold an "e" or not: both kinds of answer
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.embed_tokens.weight.fill_(1.0)  # the final norm sees ones, whatever the token
        model.lm_head.weight.zero_()
        for token in [tokenizer.im_end_id] + tokenizer.encode("e"):
            model.lm_head.weight[token] = 5.0 / cfg.hidden_size
    save_model_dir(str(root / "sft"), model, tokenizer_file, "stage: sft\n")
    prompts = root / "prompts.jsonl"
    with open(prompts, "w", encoding="utf-8") as f:
        for i in range(6):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"reverse: {'abc' * (i + 1)}"},
                                             {"role": "assistant", "content": "e"}]}) + "\n")
    return SimpleNamespace(root=root, tokenizer=tokenizer, model=model, model_path=str(root / "sft"),
                           prompts=str(prompts))


@pytest.mark.parametrize("system", ["default", "own", "custom", "none"])
def test_dpo_reads_back_the_prompt_that_was_sampled(setup, tmp_path, system):
    messages = [{"role": "user", "content": "sort: cab"}]
    if system == "own":
        messages = [{"role": "system", "content": "Answer in one word."}] + messages
    system_prompt = {"custom": "Be brief.", "none": ""}.get(system, DEFAULT_SYSTEM_PROMPT)
    item = {"prompt": messages, "references": ["abc"], "where": "x:1"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pair_record(item, "abc", "cab", "sample", 1, 4, system_prompt)) + "\n")
    pair = load_preference_pairs(str(path), quiet=True)[0]
    assert (pair["chosen"], pair["rejected"]) == ("abc", "cab")
    # DPO at its default system prompt renders the prompt the samples were drawn from
    # (none at all cannot be written in a record: DPO is then run with --system_prompt "" too)
    rows, _ = tokenize_pairs([pair], setup.tokenizer, 256, "" if system == "none" else DEFAULT_SYSTEM_PROMPT)
    sampled, _ = render(messages, setup.tokenizer, system_prompt=system_prompt, add_generation_prompt=True)
    assert rows[0]["prompt_ids"] == sampled
    assert is_pairs_file(str(path))


def test_prompts_come_from_sft_records_and_prompt_answer_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                 {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "capital of France?", "answer": ["Paris", "paris"]})
                                      + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "add", "input": "1 2", "output": "3"}]))
    items = load_prompts(str(tmp_path))
    assert [m["content"] for m in items[0]["prompt"]] == ["hi", "yo", "2+2?"] and items[0]["references"] == ["4"]
    assert items[2]["prompt"] == [{"role": "user", "content": "capital of France?"}]
    assert items[2]["references"] == ["Paris", "paris"]
    assert items[3]["prompt"][-1] == {"role": "user", "content": "add\n1 2"} and items[3]["references"] == ["3"]


def test_a_text_record_is_refused_naming_its_line(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "plain text"}) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:1: a text record has no prompt"):
        load_prompts(str(tmp_path / "t.jsonl"))


# --- the program -----------------------------------------------------------------------------------

def run_program(setup, output, *extra):
    main(["--model_path", setup.model_path, "--dataset_path", setup.prompts, "--output_path", str(output),
          "--num_samples", "6", "--max_new_tokens", "6", "--checker", "contains", "--device", "cpu",
          "--precision", "fp32", *extra])
    with open(output, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def samples_of(setup, item, index, seed):
    """(text, ended) of the 6 samples of prompt number index, drawn one at a time from the decoder."""
    ids, _ = render(item["prompt"], setup.tokenizer, add_generation_prompt=True)
    configs = [GenerationConfig(max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                                seed=sample_seed(seed, index, j, 6)) for j in range(6)]
    outs = generate_batch(setup.model, [ids] * 6, configs, vocab_size=setup.tokenizer.vocab_size, max_batch=1)
    return [(setup.tokenizer.decode(new), stats["stop"] == "stop_id") for new, stats in outs]


def test_samples_are_the_decoders_at_their_seeds_and_the_pairs_follow_the_checker(setup, tmp_path, capsys):
    records = run_program(setup, tmp_path / "pairs.jsonl", "--pairs_per_prompt", "3", "--seed", "5")
    log = capsys.readouterr().err
    check = make_checker("contains")
    prompts = load_prompts(setup.prompts)
    # what each prompt's 6 samples are, drawn one prompt at a time from the decoder
    expected_pass1, expected_passk, expected_paired = 0.0, 0, 0
    for i, item in enumerate(prompts):
        samples = samples_of(setup, item, i, seed=5)
        right = [text for text, ended in samples if ended and check(text, ["e"])]
        wrong = [text for text, ended in samples if not (ended and check(text, ["e"]))]
        expected_pass1 += len(right) / 6 / len(prompts)
        expected_passk += bool(right)
        rejectable = set(wrong) - set(right or ["e"])
        expected_paired += bool(rejectable)
        mine = [r for r in records if r["sampled"]["from"] == item["where"]]
        assert len(mine) == min(3, len(set(right or ["e"])) * len(rejectable))
        for r in mine:
            assert r["sampled"]["correct"] == len(right)
            assert r["rejected"]["value"] in wrong
            assert r["chosen"]["value"] in right if right else r["chosen"]["value"] == "e"
    assert 0 < expected_pass1 < 1 and expected_paired > 0  # the test sees both kinds of answer
    assert f"pass@1 {expected_pass1:.4f}, pass@6 {expected_passk / len(prompts):.4f}; " \
           f"{expected_paired} of {len(prompts)} prompts gave a pair" in log


def test_rejected_likely_is_the_incorrect_answer_the_model_finds_most_likely(setup, tmp_path):
    records = run_program(setup, tmp_path / "likely.jsonl", "--rejected", "likely", "--seed", "5")
    check = make_checker("contains")

    def logprob(prompt_ids, text):  # float64, as DPO sees the answer: its tokens, then <|im_end|>
        answer = setup.tokenizer.encode(text) + [setup.tokenizer.im_end_id]
        with torch.no_grad():
            logits = setup.model(torch.tensor([prompt_ids + answer]))[0].double()
        logps = logits.log_softmax(-1)
        return sum(logps[len(prompt_ids) - 1 + k, token].item() for k, token in enumerate(answer))

    compared = 0
    for i, item in enumerate(load_prompts(setup.prompts)):
        samples = samples_of(setup, item, i, seed=5)
        wrong = {text for text, ended in samples if not (ended and check(text, ["e"]))}
        chosen = {r["chosen"]["value"] for r in records if r["sampled"]["from"] == item["where"]}
        wrong -= chosen
        mine = [r for r in records if r["sampled"]["from"] == item["where"]]
        if len(wrong) < 2:
            continue
        ids, _ = render(item["prompt"], setup.tokenizer, add_generation_prompt=True)
        scores = {text: logprob(ids, text) for text in wrong}
        assert scores[mine[0]["rejected"]["value"]] == pytest.approx(max(scores.values()), abs=1e-4)
        compared += 1
    assert compared >= 2


def test_the_pairs_do_not_depend_on_the_batch_and_train_dpo_reads_them(setup, tmp_path):
    one = run_program(setup, tmp_path / "one.jsonl", "--batch_size", "1")
    many = run_program(setup, tmp_path / "many.jsonl", "--batch_size", "13")
    assert one == many and one
    assert run_program(setup, tmp_path / "one.jsonl", "--batch_size", "1") == one  # replaces its own file
    pairs = load_preference_pairs(str(tmp_path / "one.jsonl"), quiet=True)
    assert len(pairs) == len(one)


def test_bad_keys_and_outputs_are_refused_before_any_work(setup, tmp_path):
    with pytest.raises(ConfigError, match="needs key 'pattern'"):
        run_program(setup, tmp_path / "x.jsonl", "--checker", "regex")
    with pytest.raises(ConfigError, match="not a regular expression"):
        run_program(setup, tmp_path / "x.jsonl", "--checker", "regex", "--pattern", "(")
    with pytest.raises(ConfigError, match="checker"):
        run_program(setup, tmp_path / "x.jsonl", "--checker", "fuzzy")
    with pytest.raises(ConfigError, match="num_samples"):
        run_program(setup, tmp_path / "x.jsonl", "--num_samples", "0")
    mine = tmp_path / "notes.jsonl"
    mine.write_text("my own notes\n")
    with pytest.raises(UserError, match="was not written by this program"):
        run_program(setup, mine)
    assert mine.read_text() == "my own notes\n"
    with pytest.raises(UserError):
        run_program(setup, setup.prompts)  # the output would be an input


def test_the_command_line_reports_bad_data_in_one_line_with_exit_code_2(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt"}) + "\n")
    done = subprocess.run([sys.executable, "-m", "nanobumble.sample_pairs", "--model_path", setup.model_path,
                           "--dataset_path", str(bad), "--output_path", str(tmp_path / "out.jsonl")],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert "bad.jsonl:1: a text record has no prompt" in done.stderr and "Traceback" not in done.stderr
    assert not os.path.exists(tmp_path / "out.jsonl")


def test_two_processes_write_the_pairs_of_one(setup, tmp_path):
    one = run_program(setup, tmp_path / "one.jsonl", "--pairs_per_prompt", "2")
    args = ["--model_path", setup.model_path, "--dataset_path", setup.prompts, "--output_path",
            str(tmp_path / "two.jsonl"), "--num_samples", "6", "--max_new_tokens", "6", "--checker", "contains",
            "--device", "cpu", "--precision", "fp32", "--pairs_per_prompt", "2"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "nanobumble.sample_pairs"] + args, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "two.jsonl", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == one
    assert "2 processes" in done.stderr
