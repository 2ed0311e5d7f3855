"""eval.py through lm-evaluation-harness on tiny models and the shipped local tasks (eval_tasks/, no
network): two runs agree, the chosen answers and perplexities equal a hand computation with plain
transformers, an adapter folder is evaluated on its base, chat templates, the user's own task YAML,
data parallelism on 2 CPU ranks, WandB, and the errors a user meets."""

import json
import math
import re
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from dstrain.distributed import free_port
from tests import wandb_offline
from tests.helpers import REPO, assert_clean_error, assert_succeeded, run_job, run_main_in_process, script_env
from tests.tiny_chat_models import trained_models, without_chat_template

# Each run loads a model and the harness: seconds, not the fast tier's milliseconds.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TASKS = "python_docstrings,python_docstring_perplexity,python_expressions"
LIMIT = 6


@pytest.fixture(scope="module")
def models(tmp_path_factory, base_model):
    return trained_models(base_model, tmp_path_factory.mktemp("eval-models"))


def evaluate(model, output, *flags, tasks=TASKS, limit=LIMIT):
    result = run_main_in_process("eval.py", "--model", model, "--tasks", tasks, "--limit", limit, "--batch_size", 4,
                                 "--log_samples", "--output", output, *flags)
    assert_succeeded(result)
    samples = [json.loads(line) for line in output.with_suffix(".samples.jsonl").read_text().splitlines()]
    return json.loads(output.read_text()), samples, result


def by_task(samples, task):
    return sorted((s for s in samples if s["task"] == task), key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def chat_runs(models, tmp_path_factory):
    """The chat model on the three shipped tasks, twice; the second run also logs to WandB (offline)."""
    folder = tmp_path_factory.mktemp("eval-runs")
    first = evaluate(models["chat"], folder / "first" / "eval.json")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        second = evaluate(models["chat"], folder / "second" / "eval.json", "--report_to", "wandb", "--run_name", "ev")
    return first, second, folder


def test_two_runs_give_the_same_scores_and_answers(chat_runs):
    (first, first_samples, printed), (second, second_samples, _), _ = chat_runs
    assert first["results"] == second["results"]
    assert [s["resps"] for s in first_samples] == [s["resps"] for s in second_samples]
    assert set(first["results"]) == set(TASKS.split(","))
    assert all(entry["sample_len"] == LIMIT for entry in first["results"].values())
    assert first["dstrain"]["tasks"] == TASKS.split(",") and first["dstrain"]["ranks"] == 1
    # The harness's own table, printed
    assert re.search(r"\|python_docstrings\s*\|\s*1\|none\s*\|\s*0\|acc ", printed.stdout), printed.stdout


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as the harness does: the pair encoded whole, the
    context's own tokens split off the front."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


def check_multiple_choice_by_hand(model, tokenizer, samples, results):
    """Every choice's log-likelihood, the chosen answer and both accuracies, computed here."""
    correct = correct_norm = 0
    for sample in samples:
        doc = sample["doc"]
        context = (f"Docstring: {doc['summary']}\nQuestion: Which Python callable does this describe?\nAnswer:")
        lls = [loglikelihood(model, tokenizer, context, " " + choice) for choice in doc["choices"]]
        harness = [resp[0] for resp in sample["filtered_resps"]]
        assert lls == pytest.approx(harness, abs=2e-4)
        chosen = max(range(len(lls)), key=lls.__getitem__)
        chosen_norm = max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"][i]))
        assert sample["acc"] == float(chosen == doc["label"])
        assert sample["acc_norm"] == float(chosen_norm == doc["label"])
        correct += chosen == doc["label"]
        correct_norm += chosen_norm == doc["label"]
    assert results["acc,none"] == pytest.approx(correct / len(samples))
    assert results["acc_norm,none"] == pytest.approx(correct_norm / len(samples))
    return [sample["filtered_resps"] for sample in samples]


def test_multiple_choice_equals_a_hand_computation(models, chat_runs):
    (results, samples, _), _, _ = chat_runs
    tokenizer = AutoTokenizer.from_pretrained(models["chat"])
    model = AutoModelForCausalLM.from_pretrained(models["chat"]).eval()
    check_multiple_choice_by_hand(model, tokenizer, by_task(samples, "python_docstrings"),
                                  results["results"]["python_docstrings"])


def test_perplexity_equals_a_hand_computation(models, chat_runs):
    """Rolling log-likelihood of each whole docstring after the bos token (each fits one window here),
    summed into word and byte perplexity and bits per byte as the harness aggregates them."""
    (results, samples, _), _, _ = chat_runs
    tokenizer = AutoTokenizer.from_pretrained(models["chat"])
    model = AutoModelForCausalLM.from_pretrained(models["chat"]).eval()
    total = words = nbytes = 0
    for sample in by_task(samples, "python_docstring_perplexity"):
        text = sample["doc"]["text"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) < model.config.max_position_embeddings  # one window
        full = torch.tensor([[tokenizer.bos_token_id] + ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(full).logits[0].float(), dim=-1)
        ll = sum(logprobs[i, ids[i]].item() for i in range(len(ids)))
        assert sample["filtered_resps"][0] == pytest.approx(ll, abs=2e-3)
        total, words, nbytes = total + ll, words + len(re.split(r"\s+", text)), nbytes + len(text.encode())
    scores = results["results"]["python_docstring_perplexity"]
    assert scores["bits_per_byte,none"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-5)
    assert scores["byte_perplexity,none"] == pytest.approx(math.exp(-total / nbytes), rel=1e-5)
    assert scores["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-5)


def test_generation_is_scored_by_exact_match_of_the_first_line(chat_runs):
    (results, samples, _), _, _ = chat_runs
    generated = by_task(samples, "python_expressions")
    for sample in generated:
        raw = sample["resps"][0][0]
        assert "\n" not in raw  # generation stopped at the first newline
        assert sample["filtered_resps"][0] == raw.strip()
        assert sample["exact_match"] == float(raw.strip() == sample["target"])
        assert sample["target"] == repr(eval(sample["doc"]["expression"]))  # the task's answers are Python's own
    assert results["results"]["python_expressions"]["exact_match,strip"] == pytest.approx(
        sum(s["exact_match"] for s in generated) / len(generated))


def test_results_table_goes_to_wandb(chat_runs):
    _, _, folder = chat_runs
    [run_file] = (folder / "second" / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_offline.logged_rows(run_file)
    values = {key: value for row in rows for key, value in row.items()}
    second = json.loads((folder / "second" / "eval.json").read_text())["results"]
    assert values["python_docstrings/acc"] == second["python_docstrings"]["acc,none"]
    assert values["evaluation/eval_results/_type"] == "table-file"
    [table_file] = run_file.parent.glob("files/media/table/evaluation/eval_results_*.table.json")
    table = json.loads(table_file.read_text())
    logged = {(row[0], row[4]): row[5] for row in table["data"]}
    assert float(logged["python_docstring_perplexity", "bits_per_byte"]) == \
        second["python_docstring_perplexity"]["bits_per_byte,none"]
    assert float(logged["python_expressions", "exact_match"]) == second["python_expressions"]["exact_match,strip"]
    assert wandb_offline.run_record(run_file).display_name == "ev"


def test_an_adapter_folder_is_evaluated_on_its_base(models, chat_runs, tmp_path):
    results, samples, _ = evaluate(models["pirate"], tmp_path / "pirate.json", tasks="python_docstrings")
    assert results["dstrain"]["adapter"] == "pirate"
    tokenizer = AutoTokenizer.from_pretrained(models["pirate"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["chat"]), models["pirate"]).eval()
    adapted = check_multiple_choice_by_hand(model, tokenizer, by_task(samples, "python_docstrings"),
                                            results["results"]["python_docstrings"])
    (_, chat_samples, _), _, _ = chat_runs
    assert adapted != [s["filtered_resps"] for s in by_task(chat_samples, "python_docstrings")]  # the adapter counts


def test_chat_template_prompts(models, tmp_path):
    _, samples, _ = evaluate(models["chat"], tmp_path / "chat.json", "--apply_chat_template", "--system_instruction",
                             "Answer briefly.", tasks="python_docstrings", limit=2)
    for sample in samples:
        context = sample["arguments"][0][0]
        assert context.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nDocstring: ")
        assert context.endswith("<|im_end|>\n<|im_start|>assistant\n")
    plain = without_chat_template(models["chat"], tmp_path / "plain")
    result = run_main_in_process("eval.py", "--model", plain, "--tasks", "python_docstrings", "--apply_chat_template")
    assert_clean_error(result, "--apply_chat_template", "has no chat template")


def test_a_task_yaml_of_your_own_reads_local_files(models, tmp_path):
    """--include_path: the harness's usual local-data task (dataset_path: json) next to the shipped ones."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    items = [{"q": "What does str.upper() do?", "choices": ["It returns the string in uppercase.", "Arr!"], "gold": 0},
             {"q": "Say hi.", "choices": ["Hi!", "Uppercase."], "gold": 0}]
    (folder / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (folder / "mine.yaml").write_text(
        "task: my_replies\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'items.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")
    results, samples, _ = evaluate(models["chat"], tmp_path / "mine.json", "--include_path", folder,
                                   "--apply_chat_template", tasks="my_replies,python_docstrings", limit=2)
    assert results["results"]["my_replies"]["sample_len"] == 2
    # The chat model was taught exactly these replies: it prefers them.
    assert results["results"]["my_replies"]["acc,none"] == 1.0


def test_unknown_tasks_and_missing_data_offline_are_one_line_errors(models, tmp_path):
    result = run_main_in_process("eval.py", "--model", models["chat"], "--tasks", "python_docstring")
    assert_clean_error(result, "no task, group or tag named 'python_docstring'", "python_docstrings")
    # A built-in task whose data is not in the local datasets cache, offline: named, before any model loads.
    env = script_env(HF_DATASETS_CACHE=str(tmp_path / "empty-cache"))
    result = run_job([sys.executable, REPO / "eval.py", "--model", models["chat"], "--tasks", "arc_easy",
                      "--offline", "true", "--output", tmp_path / "arc.json"], env=env, timeout=300)
    assert_clean_error(result, "allenai/ai2_arc", "local datasets cache")
    assert not (tmp_path / "arc.json").exists()


def test_data_parallel_on_two_ranks_gives_the_single_process_scores(models, chat_runs, tmp_path):
    """torchrun starts 2 CPU ranks (gloo): each scores half the requests, rank 0 gathers and writes."""
    (single, single_samples, _), _, _ = chat_runs
    output = tmp_path / "dp.json"
    result = run_job([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                      free_port(), REPO / "eval.py", "--model", models["chat"], "--tasks", TASKS, "--limit", LIMIT,
                      "--batch_size", 4, "--log_samples", "--output", output], timeout=300)
    assert_succeeded(result)
    parallel = json.loads(output.read_text())
    assert parallel["dstrain"]["ranks"] == 2
    for task, scores in single["results"].items():
        for key, value in scores.items():
            assert parallel["results"][task][key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float)
                                                      else value), (task, key)
    samples = [json.loads(line) for line in output.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert sorted((s["task"], s["doc_id"]) for s in samples) == sorted((s["task"], s["doc_id"]) for s in single_samples)
    # Rank 0's progress bars count its share only: half of the 4 x 6 choices and of the 6 generations.
    assert re.search(r"Running loglikelihood requests: 100%\|\S+\| 12/12", result.stderr), result.stderr[-2000:]
    assert re.search(r"Running generate_until requests: 100%\|\S+\| 3/3", result.stderr), result.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_on_gpus_bf16_and_nccl_data_parallel(models, chat_runs, tmp_path):
    """On a GPU the model loads in bf16: perplexity within 2% of the fp32 CPU run's. With 2 GPUs, torchrun's
    ranks gather over nccl and give the one-GPU scores. Not run here (no GPU on this machine)."""
    (cpu, _, _), _, _ = chat_runs
    one, _, _ = evaluate(models["chat"], tmp_path / "gpu.json", "--device", "cuda")
    assert one["results"]["python_docstring_perplexity"]["bits_per_byte,none"] == pytest.approx(
        cpu["results"]["python_docstring_perplexity"]["bits_per_byte,none"], rel=0.02)
    if torch.cuda.device_count() < 2:
        return
    output = tmp_path / "gpus.json"
    result = run_job([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                      free_port(), REPO / "eval.py", "--model", models["chat"], "--tasks", TASKS, "--limit", LIMIT,
                      "--batch_size", 4, "--output", output], timeout=300)
    assert_succeeded(result)
    two = json.loads(output.read_text())
    assert two["dstrain"]["ranks"] == 2 and set(two["results"]) == set(one["results"])
    # bf16 sums depend a little on how requests are batched: compare the continuous score, loosely.
    assert two["results"]["python_docstring_perplexity"]["bits_per_byte,none"] == pytest.approx(
        one["results"]["python_docstring_perplexity"]["bits_per_byte,none"], rel=5e-3)
