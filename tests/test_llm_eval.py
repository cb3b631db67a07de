"""Scoring causal LMs: multiple choice by log-likelihood against a hand computation and against
lm-evaluation-harness itself, greedy generation and its scorers, scoring during a run, and
evaluate_adapter.py on a saved run and on a peft adapter trained elsewhere."""

import json

import pytest
import torch
from test_instructions import overrides, topic_rows, write_jsonl

import config
import evaluate_adapter
import train_lora
from flasc.options import ConfigError
from flasc.tasks import llm_eval

QUESTIONS = [
    {"question": "goal team match", "choices": ["sport", "business", "politics"], "answer": 0},
    {"question": "bank profit", "choices": ["sport", "business", "politics"], "answer": "business"},
    {"question": "vote party", "choices": ["sport", "business", "politics"], "answer": "C"},
]


@pytest.fixture
def lm(model_folders):
    """The tiny random Llama as transformers loads it (independent of flasc's model building),
    with MiniLM's vocabulary made a causal LM's tokenizer: a text starts with [CLS] as its
    beginning-of-sequence token, as Llama's starts with <s>, and [SEP] ends a response."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_folders["llama"])).eval()
    tok = AutoTokenizer.from_pretrained(str(model_folders["llama"]))
    tok._tokenizer.post_processor = TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", tok.cls_token_id)])
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    return model, tok


def by_hand(model, tok, context: str, continuation: str) -> float:
    """Σ log p of the continuation's tokens: the whole tokenized, the context's tokens cut off."""
    whole = tok(context + continuation)["input_ids"]  # [CLS] + tokens
    n_ctx = len(tok(context)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
    return float(sum(logp[t - 1, whole[t]] for t in range(n_ctx, len(whole))))


def test_multiple_choice_scores_are_the_choices_log_likelihoods_by_hand(tmp_path, lm):
    model, tok = lm
    path = write_jsonl(tmp_path / "mc.jsonl", QUESTIONS)
    for choices_as in ("letters", "text"):
        (tmp_path / "t.yaml").write_text(f"data_files: mc.jsonl\nchoices_as: {choices_as}\n")
        task = llm_eval.load_task_file(str(tmp_path / "t.yaml"))
        correct = correct_norm = 0
        for row in task.rows:
            text = row["question"]
            shown = row["choices"]
            if choices_as == "letters":
                text += "".join(f"\n{'ABC'[i]}. {c}" for i, c in enumerate(row["choices"]))
                shown = ["A", "B", "C"]
            hand = [by_hand(model, tok, text + "\nAnswer:", " " + s) for s in shown]
            requests = llm_eval.choice_requests(tok, task, row)
            got = llm_eval.continuation_logprobs(
                model, [(c, x) for c, x, _ in requests], "cpu", False, tok.pad_token_id
            )
            assert got == pytest.approx(hand, rel=1e-4)
            correct += max(range(3), key=hand.__getitem__) == row["answer"]
            norm = [h / len(" " + s) for h, s in zip(hand, shown)]
            correct_norm += max(range(3), key=norm.__getitem__) == row["answer"]
        assert llm_eval.score(model, tok, task, "cpu") == pytest.approx(
            {"acc": correct / 3, "acc_norm": correct_norm / 3}
        )
    assert [r["answer"] for r in llm_eval.load_task_file(path).rows] == [0, 1, 2]


def test_greedy_generation_is_the_argmax_token_by_token(lm):
    model, tok = lm
    prompts = [tok("goal team", add_special_tokens=False)["input_ids"], tok("a", add_special_tokens=False)["input_ids"]]
    got = llm_eval.generate(model, tok, prompts, 5, "cpu")
    for prompt, text in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(5):
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                ids.append(nxt)
        assert text == tok.decode(ids[len(prompt) :], skip_special_tokens=True)


def test_generation_scorers_by_hand():
    assert llm_eval.normalise("The  Cat, sat!") == "cat sat"
    assert llm_eval.scored("the cat sat.", "Cat sat", "exact_match")
    assert not llm_eval.scored("a cat sat down", "cat sat", "exact_match")
    assert llm_eval.scored("I think a cat sat down", "cat sat", "contains")
    assert llm_eval.scored("so she has 1,234 apples", "Natalia sold 48... #### 1234", "final_number")
    assert not llm_eval.scored("no number here", "#### 3", "final_number")
    assert llm_eval.cut_at_stop("42\n\nQuestion: next", ["\n\n", "Question:"]) == "42"


def test_a_task_file_says_what_is_wrong_in_one_line(tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["x"], "answer": 0}])
    with pytest.raises(ConfigError, match="row 0 has 1 choices; multiple choice needs at least 2"):
        llm_eval.load_task_file(str(tmp_path / "mc.jsonl"))
    (tmp_path / "t.yaml").write_text("data_files: mc.jsonl\nscorer: bleu\n")
    with pytest.raises(ConfigError, match="unknown setting|scorer: 'bleu' is not one of"):
        llm_eval.load_task_file(str(tmp_path / "t.yaml"))
    with pytest.raises(ConfigError, match="llm_tasks: scoring tasks score a causal LM, and dataset bbcnews"):
        config.load_config(overrides={"llm_tasks": [str(tmp_path / "t.yaml")]})


def test_a_run_scores_its_tasks_and_evaluate_adapter_scores_the_saved_adapter_alike(tmp_path, model_folders):
    files = write_jsonl(tmp_path / "train.jsonl", topic_rows(40))
    mc = write_jsonl(tmp_path / "topics.jsonl", QUESTIONS)
    gen = write_jsonl(tmp_path / "say.jsonl", [{"question": "Name the topic.", "answer": "sport"}] * 2)
    cfg = config.load_config(
        overrides=overrides(
            tmp_path, model_folders, files, server_rounds=2, llm_tasks=[mc, gen], client_opt="adamw", client_lr=0.05
        )
    )
    run_dir = train_lora.train(cfg)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"llm_topics_acc", "llm_topics_acc_norm", "llm_say_exact_match"} <= set(last)
    assert summary["llm_topics_acc"] == last["llm_topics_acc"]
    assert evaluate_adapter.main([str(run_dir), "--task", mc, "--task", gen, "--gpu", "cpu"]) == 0
    saved = json.loads((run_dir / "llm_eval.json").read_text())["results"]
    assert (
        saved["topics"]["acc"] == last["llm_topics_acc"] and saved["say"]["exact_match"] == last["llm_say_exact_match"]
    )


def test_evaluate_adapter_scores_a_peft_adapter_trained_elsewhere(tmp_path, lm, model_folders, capsys):
    from peft import LoraConfig, get_peft_model

    model, tok = lm
    model.save_pretrained(tmp_path / "base")  # with its output layer (model_folders' has none: it would be drawn anew)
    tok.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    )
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # an adapter that changes the scores
    peft_model.save_pretrained(tmp_path / "adapter")
    mc = write_jsonl(tmp_path / "topics.jsonl", QUESTIONS)
    expected = llm_eval.score(peft_model.eval(), tok, llm_eval.load_task_file(mc), "cpu")
    code = evaluate_adapter.main(
        [str(tmp_path / "adapter"), "--task", mc, "--model-path", str(tmp_path / "base"), "--gpu", "cpu"]
    )
    assert code == 0
    assert json.loads((tmp_path / "adapter" / "llm_eval.json").read_text())["results"]["topics"] == expected
    assert evaluate_adapter.main([str(tmp_path), "--task", mc]) == 2
    assert "neither a flasc run folder" in capsys.readouterr().err


def test_lm_evaluation_harness_scores_a_local_task_as_flasc_does(tmp_path, lm, model_folders):
    pytest.importorskip("lm_eval")
    model, tok = lm
    mc = write_jsonl(tmp_path / "topics.jsonl", QUESTIONS * 2)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "flasc_topics.yaml").write_text(
        "task: flasc_topics\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {mc}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    rows = [{**q, "answer": i} for q, i in zip(QUESTIONS * 2, [0, 1, 2] * 2)]
    numbered = write_jsonl(tmp_path / "numbered.jsonl", rows)
    (tmp_path / "tasks" / "flasc_topics.yaml").write_text(
        (tmp_path / "tasks" / "flasc_topics.yaml").read_text().replace(mc, numbered)
    )
    (tmp_path / "ours.yaml").write_text("data_files: numbered.jsonl\nchoices_as: text\n")
    ours = llm_eval.score(model, tok, llm_eval.load_task_file(str(tmp_path / "ours.yaml")), "cpu")
    from peft import LoraConfig, get_peft_model

    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    # an adapter trained elsewhere whose B is still zero: the base model's scores
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    args = [str(tmp_path / "adapter"), "--task", "flasc_topics", "--include-path", str(tmp_path / "tasks")]
    assert evaluate_adapter.main([*args, "--model-path", str(tmp_path / "base"), "--gpu", "cpu"]) == 0
    harness = json.loads((tmp_path / "adapter" / "llm_eval.json").read_text())["results"]["flasc_topics"]
    assert harness["acc,none"] == pytest.approx(ours["acc"]) and harness["acc_norm,none"] == pytest.approx(
        ours["acc_norm"]
    )
