"""dataset: instructions: records of every shape, the templates, the prompt mask and the loss on
responses, truncation, splits and partitions, and local training by steps with accumulation."""

import csv
import json
import math

import numpy as np
import pytest
import torch

import config
import data
import train_lora
from data import instructions
from data import partition as partition_mod
from flasc import models
from flasc.client.local import NO_EXTRAS, client_lr_at
from flasc.federation.population import make_clients
from flasc.runtime import seeding
from flasc.tasks import llm_eval, objectives, prompts
from flasc.tasks.evaluation import Hidden

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOPICS = {"sport": ["match", "goal", "team"], "business": ["bank", "profit", "market"], "politics": ["vote", "party"]}


def topic_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca records: a text of topic words -> its topic, with a category and a user each."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        topic = list(TOPICS)[i % 3]
        words = list(rng.choice(TOPICS[topic], 3)) + list(rng.choice(["the", "a", "news"], 2))
        rng.shuffle(words)
        rows.append(
            {
                "instruction": "Name the topic.",
                "input": " ".join(words),
                "output": topic,
                "category": topic,
                "user": f"u{i % 4}",
            }
        )
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok(model_folders):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_folders["llama"]))


def overrides(tmp_path, model_folders, files, **extra) -> dict:
    return {
        **dict(
            dataset="instructions",
            data_files=files,
            model=str(model_folders["llama"]),
            data_dir=str(tmp_path / "data"),
            dir=str(tmp_path / "runs"),
            name="run",
            max_length=48,
            clients=4,
            server_batch=2,
            server_rounds=1,
            lora_rank=2,
            client_batch=4,
            gpu="cpu",
        ),
        **extra,
    }


def load_settings(**given) -> dict:
    """instructions.load's settings: the data set's own options at their defaults, as given."""
    defaults = {k: config.load_config()[k] for k in instructions.options}
    return {**defaults, **given}


# ---------------------------------------------------------------- templates
def test_default_template_is_alpacas_text_exactly():
    with_input = instructions.Conversation("Sum them.", "3", input="1 and 2")
    assert instructions.default_prompt(with_input) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSum them.\n\n### Input:\n1 and 2\n\n### Response:\n"
    )
    chat = instructions.Conversation("And now?", "4", system="Be brief.", history=[("Hi", "Hello")])
    assert instructions.default_prompt(chat) == (
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello\n\n### Instruction:\nAnd now?\n\n### Response:\n"
    )
    assert instructions.default_prompt(instructions.Conversation("Go.", "ok")).startswith(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    )


def test_a_chat_template_writes_the_prompt_and_the_response(tok):
    chat_tok = tok.__class__.from_pretrained(tok.name_or_path)
    chat_tok.chat_template = CHATML
    c = instructions.Conversation("Sum them.", "3", input="1 and 2", system="Be brief.")
    prompt, response = instructions.render(chat_tok, c)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nSum them.\n\n1 and 2<|im_end|>\n<|im_start|>assistant\n"
    )
    assert response == "3<|im_end|>\n"
    # the tokenizer's own (BERT) end token is not in the template's turn: it is added
    ids, prompt_len = instructions.encode(chat_tok, c, 200)
    assert (
        ids[-1] == chat_tok.sep_token_id and ids[:prompt_len] == chat_tok(prompt, add_special_tokens=False)["input_ids"]
    )


# ---------------------------------------------------------------- the mask and the loss
def test_prompt_positions_are_masked_and_the_loss_counts_response_tokens_by_hand(tok):
    c = instructions.Conversation("Name the topic.", "sport", input="goal team")
    split, kept = instructions.tokenize_split(tok, [c, instructions.Conversation("Go.", "business news")], 64)
    assert kept == [0, 1]
    batch = split.batch(torch.arange(2))
    prompt = tok(instructions.default_prompt(c), add_special_tokens=False)["input_ids"]
    response = tok("sport", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    expected = [tok.cls_token_id, *prompt, *response]  # BERT's tokenizer starts a text with [CLS]
    n = len(expected)
    assert batch["input_ids"][0, :n].tolist() == expected
    assert batch["labels"][0, :n].tolist() == [-100] * (n - len(response)) + response
    assert (batch["labels"][0, n:] == -100).all() and (batch["attention_mask"][0, n:] == 0).all()

    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, 50, dtype=torch.float64)
    batch = {
        **batch,
        "input_ids": batch["input_ids"] % 50,
        "labels": torch.where(batch["labels"] >= 0, batch["labels"] % 50, -100),
    }
    terms = []
    for row in range(2):
        for t in range(batch["input_ids"].shape[1] - 1):
            y = int(batch["labels"][row, t + 1])
            if y >= 0:
                terms.append(-torch.log_softmax(logits[row, t], -1)[y])
    assert len(terms) == objectives.NextToken().units(batch)
    assert float(objectives.NextToken().loss(logits, batch)) == pytest.approx(float(sum(terms) / len(terms)), rel=1e-6)


def test_hidden_states_meet_the_output_layer_in_chunks_with_the_same_loss_and_gradients(monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 37, bias=False)
    states = torch.randn(3, 9, 8, requires_grad=True)
    labels = torch.randint(0, 37, (3, 9))
    labels[:, :4] = -100
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones(3, 9, dtype=torch.long), "labels": labels}
    whole = objectives.NextToken().loss(head(states), batch)
    (g_whole,) = torch.autograd.grad(whole, states)
    monkeypatch.setattr(objectives, "CHUNK_LOGITS", 37 * 2)  # two positions a chunk
    chunked = objectives.NextToken().loss(Hidden(states, head, False), batch)
    (g_chunked,) = torch.autograd.grad(chunked, states)
    assert float(chunked.detach()) == pytest.approx(float(whole.detach()), rel=1e-6)
    assert torch.allclose(g_chunked, g_whole, atol=1e-7)


# ---------------------------------------------------------------- truncation
def test_a_long_prompt_loses_its_start_and_a_response_that_does_not_fit_is_dropped(tok):
    long = instructions.Conversation("word " * 60, "sport")
    ids, prompt_len = instructions.encode(tok, long, 20)
    response = tok("sport", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    full_prompt = tok(instructions.default_prompt(long), add_special_tokens=False)["input_ids"]
    assert len(ids) == 20 and ids[prompt_len:] == response
    assert ids[:prompt_len] == [tok.cls_token_id, *full_prompt[-(20 - 1 - len(response)) :]]  # the cue stays
    assert instructions.encode(tok, instructions.Conversation("Go.", "word " * 30), 20) is None


def test_dropped_examples_are_counted_in_the_partition_report(tmp_path, model_folders):
    rows = topic_rows(40)
    for r in rows[:3]:
        r["output"] = "word " * 60  # responses longer than max_length
    files = write_jsonl(tmp_path / "train.jsonl", rows)
    run_dir = train_lora.train(config.load_config(overrides=overrides(tmp_path, model_folders, files)))
    summary = json.loads((run_dir / "partition.json").read_text())["summary"]
    dropped = summary["dropped_examples"]
    assert sum(dropped.values()) == 3 and summary["examples"] + dropped["train"] == 40 - 2 * 2  # 2 held out each
    line = (run_dir / "train.log").read_text().split("dropped: ")[1].split("\n")[0]
    assert line.startswith(", ".join(f"{n} {s}" for s, n in dropped.items())) and "max_length 48" in line


# ---------------------------------------------------------------- shapes, files, splits
def test_every_shape_and_file_type_gives_the_same_tokens(tmp_path, tok):
    rows = [{"instruction": f"Say {w}.", "output": w} for w in ("yes", "no", "maybe", "never", "always")]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
            for r in rows
        ],
    )
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["q", "a"])
        w.writeheader()
        w.writerows({"q": r["instruction"], "a": r["output"]} for r in rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"prompt": r["instruction"], "response": r["output"]} for r in rows]),
        tmp_path / "p.parquet",
    )
    settings = load_settings(val_fraction=0.2, test_fraction=0.2)
    sources = {
        "alpaca": {"data_files": {"train": [str(tmp_path / "a.json")]}},
        "messages": {"data_files": {"train": [str(tmp_path / "m.jsonl")]}},
        "columns": {"data_files": {"train": [str(tmp_path / "p.csv")]}, "columns": {"prompt": "q", "response": "a"}},
        "parquet": {"data_files": {"train": [str(tmp_path / "p.parquet")]}},
    }
    got = {}
    for name, source in sources.items():
        loaded = instructions.load(str(tmp_path / name), tok, "tok", 32, {**settings, **source})
        got[name] = {s: loaded.splits[s].input_ids.tolist() for s in instructions.SPLITS}
    assert got["alpaca"] == got["messages"] == got["columns"] == got["parquet"]
    assert [len(v) for v in got["alpaca"].values()] == [3, 1, 1]


def test_own_splits_are_kept_and_missing_ones_carved_the_same_for_every_seed(tmp_path, tok):
    rows = topic_rows(50)
    files = {
        "train": [write_jsonl(tmp_path / "t.jsonl", rows[:40])],
        "test": [write_jsonl(tmp_path / "e.jsonl", rows[40:])],
    }
    settings = load_settings(data_format="alpaca", val_fraction=0.1, test_fraction=0.5)
    loaded = instructions.load(str(tmp_path / "d"), tok, "tok", 48, {**settings, "data_files": files})
    assert [len(loaded.splits[s]) for s in instructions.SPLITS] == [36, 4, 10]  # test: the file's own
    sampled = instructions.sample(list(range(100)), 10)  # train_examples: OpenFedLLM's dataset_sample
    assert (
        sampled == sorted(set(sampled)) and len(sampled) == 10 and sampled == instructions.sample(list(range(100)), 10)
    )
    again = instructions.carve({"train": list(range(40))}, 0.1, 0.5)
    assert again == instructions.carve({"train": list(range(40))}, 0.1, 0.5)
    assert sorted(again["train"] + again["validation"] + again["test"]) == list(range(40))


# ---------------------------------------------------------------- partitions
def test_iid_dirichlet_over_categories_and_natural_users(tmp_path, model_folders):
    files = write_jsonl(tmp_path / "train.jsonl", topic_rows(120))
    base = overrides(tmp_path, model_folders, files, columns={"category": "category", "user": "user"})
    cfg = config.load_config(overrides={**base, "partition": "iid"})
    task = data.load_task_for(cfg, lambda: models.load_tokenizer(cfg))
    assert sorted(len(c) for c in make_clients(cfg, task)) == [27, 27, 27, 27]  # 108 after 6 + 6 held out

    cfg = config.load_config(overrides={**base, "partition": "dirichlet", "iid_alpha": 0.1})
    clients = [c.numpy() for c in make_clients(cfg, task)]
    assert set(task.category_names) == set(TOPICS) and len(task.categories) == len(task.train)
    expected = partition_mod.dirichlet(task.categories, 4, 0.1, seeding.numpy_rng(cfg.seed, "partition"), 1)
    assert all(np.array_equal(a, b) for a, b in zip(clients, expected))
    hist = partition_mod.label_histogram(clients, task.categories, 3)
    assert hist.sum() == len(task.train) and (hist.max(1) / hist.sum(1)).mean() > 0.6  # skewed

    cfg = config.load_config(overrides={**base, "partition": "auto", "clients": 0})
    assert data.resolved_partition(cfg) == "natural"
    clients = make_clients(cfg, task)
    assert len(clients) == 4 and all(len(set(task.users[c.numpy()])) == 1 for c in clients)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"partition": "natural"}, "partition: natural makes each user a client; dataset instructions needs"),
        ({"partition": "dirichlet"}, "partition: dirichlet skews categories"),
        ({"columns": {"answer": "a"}}, "columns: 'answer' is not a field"),
        ({"hf_dataset": "org/name"}, "exactly one of them; got both"),
        ({"client_steps": 10, "early_stopping": 0.9}, "early_stopping: a client stops after an epoch"),
        ({"client_lr_min": 0.001}, "client_lr_min: the lr a client schedule decays to"),
        ({"max_length": 4096}, "max_length: 4096 tokens is more than model .* has positions for \\(2048\\)"),
    ],
)
def test_refusals(tmp_path, model_folders, extra, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load_config(overrides={**overrides(tmp_path, model_folders, "x.jsonl"), **extra})


def test_data_files_on_another_data_set_and_an_offline_hub_id_are_refused(tmp_path, monkeypatch, tok):
    with pytest.raises(config.ConfigError, match="data_files: dataset bbcnews reads its own files"):
        config.load_config(overrides={"data_files": "x.jsonl"})
    monkeypatch.setenv("FLASC_OFFLINE", "1")
    settings = load_settings(hf_dataset="flwrlabs/alpaca-gpt4", data_files=None)
    with pytest.raises(
        data.DataUnavailable, match="hf_dataset flwrlabs/alpaca-gpt4 is not read here.*point data_files"
    ):
        instructions.load(str(tmp_path), tok, "tok", 32, settings)


# ---------------------------------------------------------------- local training as LLM runs do it
def test_flowertunes_cosine_client_schedule_by_hand():
    cfg = config.load_config(
        overrides={"client_schedule": "cosine", "client_lr": 5e-5, "client_lr_min": 1e-6, "server_rounds": 200}
    )
    assert client_lr_at(cfg, 0) == pytest.approx(1e-6 + 0.5 * (5e-5 - 1e-6) * (1 + math.cos(math.pi / 200)))
    assert client_lr_at(cfg, 99) == pytest.approx((5e-5 + 1e-6) / 2)
    assert client_lr_at(cfg, 199) == pytest.approx(1e-6)
    assert client_lr_at(config.load_config(), 7) == config.load_config().client_lr


def test_client_steps_take_that_many_steps_and_accumulation_equals_the_larger_batch(tmp_path, model_folders):
    """4 steps of 2 x 4 examples = 4 steps of 8 (8 divides each client's 24): the same gradients,
    the tokens of each minibatch weighted by their share of the step's (responses of 1 to 5 words)."""
    rows = topic_rows(120)
    for i, r in enumerate(rows):
        r["output"] = " ".join([r["output"]] * (1 + i % 5))
    files = write_jsonl(tmp_path / "train.jsonl", rows)
    base = overrides(
        tmp_path,
        model_folders,
        files,
        lora_dropout=0.0,
        base_dropout=False,
        client_opt="adamw",
        client_lr=0.01,
        client_weight_decay=0.1,
        max_grad_norm=0.5,
        client_steps=4,
        val_fraction=0.1,
        test_fraction=0.1,
        train_examples=0,
    )
    results = {}
    for name, extra in {"accumulated": {"client_batch": 4, "grad_accum": 2}, "one_batch": {"client_batch": 8}}.items():
        fed = train_lora.build(config.load_config(overrides={**base, **extra}), torch.device("cpu"))
        job = fed.plan_round(0).jobs[0]
        results[name] = (job.start, *fed.worker.train_job(0, job))
    start, a, ma = results["accumulated"]
    _, b, mb = results["one_batch"]
    assert ma["steps"] == mb["steps"] == 4 and ma["count"] == mb["count"] > 0
    assert float((a - start).abs().max()) > 1e-4
    assert torch.allclose(a, b, atol=1e-6)
    assert ma["loss_sum"] == pytest.approx(mb["loss_sum"], rel=1e-5)


def test_the_client_optimizer_gets_its_options(tmp_path, model_folders):
    files = write_jsonl(tmp_path / "train.jsonl", topic_rows(40))
    cfg = config.load_config(
        overrides=overrides(
            tmp_path,
            model_folders,
            files,
            client_opt="adamw",
            client_beta1=0.8,
            client_beta2=0.95,
            client_eps=1e-6,
            client_weight_decay=0.05,
        )
    )
    fed = train_lora.build(cfg, torch.device("cpu"))
    local = fed.worker.local_client(0, 0, fed.flat.params, fed.flat.read(), None, NO_EXTRAS)
    group = local.opt.param_groups[0]
    assert isinstance(local.opt, torch.optim.AdamW)
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.05)


def test_an_instruction_run_trains_on_responses(tmp_path, model_folders):
    files = write_jsonl(tmp_path / "train.jsonl", topic_rows(80))
    cfg = config.load_config(
        overrides=overrides(
            tmp_path,
            model_folders,
            files,
            server_rounds=3,
            eval_freq=1,
            client_opt="adamw",
            client_lr=0.02,
            client_steps=4,
        )
    )
    run_dir = train_lora.train(cfg)
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds[-1]["val_loss"] < rounds[0]["val_loss"]
    assert rounds[-1]["val_perplexity"] == pytest.approx(math.exp(rounds[-1]["val_loss"]))


@pytest.mark.parametrize(
    "preset, fetch",
    [
        ("flowertune/general_nlp", "flwrlabs/alpaca-gpt4"),
        ("flowertune/finance", "flwrlabs/fingpt-sentiment-train"),
        ("flowertune/medical", "flwrlabs/medical-meadow-medical-flashcards"),
        ("flowertune/code", "flwrlabs/code-alpaca-20k"),
        ("openfedllm/alpaca", "vicgalle/alpaca-gpt4"),
        ("fsllm/dolly", "databricks/databricks-dolly-15k"),
    ],
)
def test_the_llm_presets_validate_and_say_what_to_fetch(preset, fetch, tmp_path, model_folders, monkeypatch):
    """With a copy of the model (here a tiny one's folder), a 0-round run stops at the data, saying what to fetch."""
    monkeypatch.setenv("FLASC_OFFLINE", "1")
    cfg = config.load_config(
        preset, {"model_path": str(model_folders["llama"]), "server_rounds": 0, "dir": str(tmp_path), "gpu": "cpu"}
    )
    assert cfg.dataset == "instructions" and cfg.hf_dataset == fetch
    with pytest.raises(data.DataUnavailable, match=f"hf_dataset {fetch} is not read here.*point data_files"):
        train_lora.train(cfg)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_clients_trained_together_equal_clients_trained_alone(tmp_path, model_folders):
    """Stacked clients on an instruction task: padding and token labels per client, steps with accumulation."""
    rows = topic_rows(90)
    for i, r in enumerate(rows):
        r["input"] = " ".join([r["input"]] * (1 + i % 4))  # prompts of different lengths
    files = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = config.load_config(
        overrides=overrides(
            tmp_path,
            model_folders,
            files,
            lora_dropout=0.0,
            base_dropout=False,
            client_steps=3,
            grad_accum=2,
            client_opt="adamw",
            client_lr=0.01,
            clients=4,
            server_batch=3,
            client_parallelism=3,
        )
    )
    fed = train_lora.build(cfg, torch.device("cpu"))
    jobs = fed.plan_round(0).jobs
    alone = [fed.worker.train_job(0, job) for job in jobs]
    together = fed.worker.train_together(0, jobs)
    for job, (a, ma), (b, mb) in zip(jobs, alone, together):
        assert float((a - job.start).abs().max()) > 1e-4
        assert float((a - b).abs().max()) <= 2e-5  # adaptive optimizer: tests/test_stacked.py's tolerance
        assert ma["steps"] == mb["steps"] == 3 and ma["count"] == mb["count"]
        assert mb["loss_sum"] == pytest.approx(ma["loss_sum"], rel=2e-5)


@pytest.mark.parametrize(
    "extra",
    [
        {"dl_density": 0.25, "ul_density": 0.25},
        {"merging_strategy": "ties", "merge_space": "product", "density": 0.5},
        {"noise_multiplier": 0.5, "l2_clip_norm": 0.5},
        {"tiers": 2, "lora_rank": 4, "syshet": "rankl1", "freeze_a": True},  # FFA-LoRA on rank tiers
    ],
    ids=["flasc", "ties_product", "dp", "ffa_lora_tiers"],
)
def test_instruction_runs_take_flascs_communication_merging_privacy_and_tiers(tmp_path, model_folders, extra):
    """One round each; with FLASC's densities every client sends a quarter of the values, with the
    top-k's bytes (4 per value plus the smaller of a bitmap and 4-byte indices)."""
    files = write_jsonl(tmp_path / "train.jsonl", topic_rows(60))
    cfg = config.load_config(overrides=overrides(tmp_path, model_folders, files, client_steps=2, **extra))
    run_dir = train_lora.train(cfg)
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val_loss"] > 0 and "val_perplexity" in record
    if "ul_density" in extra:
        fed = train_lora.build(cfg, torch.device("cpu"))
        n = fed.flat.numel
        k = int(n * 0.25)
        sparse = 4 * k + min(math.ceil(n / 8), 4 * k)
        assert record["bytes_up"] == cfg.server_batch * sparse


def test_scoring_tasks_are_due_every_llm_task_freq_rounds_and_at_the_last(tmp_path, model_folders):
    mc = write_jsonl(tmp_path / "topics.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    base = overrides(tmp_path, model_folders, "x.jsonl", llm_tasks=[mc], server_rounds=10, eval_freq=2)
    scores = llm_eval.RunScores(config.load_config(overrides={**base, "llm_task_freq": 4}), None)
    assert [r + 1 for r in range(10) if scores.due(r)] == [4, 8, 10]
    scores = llm_eval.RunScores(config.load_config(overrides=base), None)
    assert [r + 1 for r in range(10) if scores.due(r)] == [10]
    with pytest.raises(config.ConfigError, match="llm_task_freq: 3 is not a multiple of eval_freq 2"):
        config.load_config(overrides={**base, "llm_task_freq": 3})


def test_the_offline_demo_writes_bbc_news_as_instructions_and_a_model_reading_minilms_embeddings(tmp_path):
    """docs/llm.md's demo: each split's records are its BBC News articles (first words) answered by
    their topics, the scoring task asks the test split's, and the model ties MiniLM's embeddings to
    its output layer, with [CLS] opening a text and [SEP] ending a response."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from data import bbc_instructions, bbcnews
    from flasc.models import catalog, demo_llm

    assert bbc_instructions.main(["--out", str(tmp_path), "--words", "4"]) == 0
    raw = bbcnews.load_raw("")
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        rows = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        texts, labels = raw.splits[split]
        assert [r["output"] for r in rows] == [raw.label_names[y] for y in labels]
        assert [r["category"] for r in rows] == [r["output"] for r in rows]
        assert all(r["input"].split() == t.split()[:4] for r, t in zip(rows, texts))
    task = llm_eval.load_task_file(str(tmp_path / "topics.yaml"))
    assert (task.kind, task.template, task.choices_as) == ("multiple_choice", "instruction", "text")
    assert len(task.rows) == len(raw.splits["test"][1])
    assert all(r["choices"] == raw.label_names for r in task.rows)
    assert [r["choices"][r["answer"]] for r in task.rows] == [raw.label_names[y] for y in raw.splits["test"][1]]

    demo_llm.write(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    minilm = AutoModel.from_pretrained(str(catalog.minilm_dir())).get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, minilm)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert prompts.start_tokens(tok) == [tok.cls_token_id] and prompts.end_token(tok) == tok.sep_token_id


@pytest.mark.parametrize("client_opt", ["adamw", "sgd"])
def test_weight_decay_leaves_the_entries_a_mask_freezes_and_decays_the_rest_as_torch_does(client_opt):
    """A client_freeze / tier / alternating mask freezes entries; the optimizer's weight decay would
    still shrink them. The trained entries follow torch's optimizer on the masked gradient."""
    from flasc.client.local import LocalClient, LocalSettings
    from flasc.client.optimizers import OptimizerOptions

    torch.manual_seed(0)
    w0 = torch.randn(3, 4)
    mask = (torch.arange(12).reshape(3, 4) % 3 == 0).float()
    grads = [torch.randn(3, 4) for _ in range(3)]
    settings = LocalSettings(client_opt, 0.1, 0.0, 0.0, client_steps=3, hyper=OptimizerOptions(weight_decay=0.5))
    w = w0.clone().requires_grad_(True)
    client = LocalClient([w], ["w"], iter([iter([{}] * 3)]), settings, None, [mask])

    class OneUnit:  # the objective's count of a minibatch's units
        units = staticmethod(lambda batch: 1)

    for g in grads:  # each step: a minibatch drawn, its gradient given, the step taken
        client.next_batch(OneUnit)
        w.grad = g.clone()
        client.last = (torch.tensor(0.0), 0, 1)
        client.step()
    ref = w0.clone().requires_grad_(True)
    opt = (torch.optim.AdamW if client_opt == "adamw" else torch.optim.SGD)(
        [ref], lr=0.1, weight_decay=0.5, **({"momentum": 0.9} if client_opt == "sgd" else {})
    )
    for g in grads:
        ref.grad = g * mask
        opt.step()
    assert torch.equal(w.detach()[mask == 0], w0[mask == 0])
    assert torch.allclose(w.detach()[mask == 1], ref.detach()[mask == 1])
    assert not torch.allclose(w.detach()[mask == 1], w0[mask == 1])
