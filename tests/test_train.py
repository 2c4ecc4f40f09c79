import math

import pandas as pd
import pytest
import torch
from conftest import TEXTS
from safetensors.torch import load_file

import train


def test_mnr_loss_against_a_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # cosines: a0.b0 = 1/sqrt2, a0.b1 = 0, a1.b0 = 1/sqrt2, a1.b1 = 1
    c = 1 / math.sqrt(2)
    scale = 20.0
    a_to_b = (-math.log(math.exp(scale * c) / (math.exp(scale * c) + 1))
              - math.log(math.exp(scale) / (math.exp(scale * c) + math.exp(scale)))) / 2
    b_to_a = (-math.log(math.exp(scale * c) / (math.exp(scale * c) + math.exp(scale * c)))
              - math.log(math.exp(scale) / (1 + math.exp(scale)))) / 2
    loss = train.multiple_negatives_ranking_loss(a, b, scale)
    assert loss.item() == pytest.approx((a_to_b + b_to_a) / 2, rel=1e-5)


def write_pairs(folder, rows=8):
    frame = pd.DataFrame(
        {"a": [TEXTS[i % 5] + f" study {i}" for i in range(rows)],
         "b": [TEXTS[(i + 1) % 5] + f" follow-up {i}" for i in range(rows)],
         "label": [1, 0] * (rows // 2)}
    )
    folder.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        frame.to_csv(folder / f"{split}.csv", index=False)


def run_train(tiny_bert, data, output_dir, *extra):
    return train.main(
        ["--model_name_or_path", tiny_bert, "--dataset", f"CVD={data / 'CVD'}", "--dataset", f"COPD={data / 'COPD'}",
         "--output_dir", str(output_dir), "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
         "--max_seq_length", "32", "--seed", "3", *extra]
    )


@pytest.fixture
def tiny_data(tmp_path):
    for domain in ("CVD", "COPD"):
        write_pairs(tmp_path / "data" / domain)
    return tmp_path / "data"


def test_training_lowers_the_loss_and_saves_a_loadable_model(tiny_bert, tiny_data, tmp_path):
    from transformers import AutoModel

    model, tokenizer = train.load_model(train.parse_args(["--model_name_or_path", tiny_bert]), ["CVD", "COPD"])
    collate = train.make_collate(model, tokenizer, 32)
    pairs = train.training_pairs({"CVD": train.load_domain_datasets({"CVD": str(tiny_data / "CVD")})["CVD"]}, ["CVD", "COPD"])
    batch = collate([pairs[i] for i in range(len(pairs))])

    def loss():
        a = model(**batch["a"], domain_ids=batch["domain_ids"]).pooler_output
        b = model(**batch["b"], domain_ids=batch["domain_ids"]).pooler_output
        return train.multiple_negatives_ranking_loss(a, b, 20.0)

    model.eval()  # no dropout: the comparison shows the step alone
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = loss()
    before.backward()
    optimizer.step()
    assert loss().item() < before.item()

    card = run_train(tiny_bert, tiny_data, tmp_path / "out", "--max_train_steps", "2")
    assert card["step"] == 2 and "f1_max" in card["metrics"]["all"]
    loaded = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert loaded.config.domains == ["CVD", "COPD"]


def test_kill_and_resume_reaches_the_same_weights(tiny_bert, tiny_data, tmp_path):
    import shutil

    run_train(tiny_bert, tiny_data, tmp_path / "straight", "--max_train_steps", "4")
    run_train(tiny_bert, tiny_data, tmp_path / "resumed", "--max_train_steps", "4", "--checkpointing_steps", "1",
              "--checkpoints_total_limit", "0")
    # as if killed right after the checkpoint of step 1 (mid-epoch: 2 batches per epoch)
    for later in (2, 3, 4):
        shutil.rmtree(tmp_path / "resumed" / f"checkpoint-{later}")
    (tmp_path / "resumed" / "model.safetensors").unlink()
    card = run_train(tiny_bert, tiny_data, tmp_path / "resumed", "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert card["step"] == 4
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_malformed_data_is_refused_before_training(tiny_bert, tmp_path):
    folder = tmp_path / "bad" / "CVD"
    folder.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        pd.DataFrame({"a": ["x"], "text_b": ["y"], "label": [1]}).to_csv(folder / f"{split}.csv", index=False)
    with pytest.raises(SystemExit, match=r"lacks columns \['b'\]"):
        train.main(["--model_name_or_path", tiny_bert, "--dataset", f"CVD={folder}", "--output_dir", str(tmp_path / "o")])


def launch_two_processes(tiny_bert, tiny_data, output_dir, env):
    import os
    import subprocess
    import sys

    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", "29533", str(train.Path(train.__file__)), "--model_name_or_path", tiny_bert,
        "--dataset", f"CVD={tiny_data / 'CVD'}", "--dataset", f"COPD={tiny_data / 'COPD'}",
        "--per_device_train_batch_size", "2", "--max_seq_length", "32", "--max_train_steps", "2",
        "--checkpointing_steps", "1", "--output_dir", str(output_dir),
    ]
    environment = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"} | {"HF_HUB_OFFLINE": "1"} | env
    return subprocess.run(command, env=environment, capture_output=True, text=True)


def test_two_process_cpu_run_saves_checkpoints_that_automodel_loads(tiny_bert, tiny_data, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    result = launch_two_processes(tiny_bert, tiny_data, tmp_path / "out", {"ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=True)
    batch = tokenizer(["[CVD] " + TEXTS[0], "[COPD] " + TEXTS[1]], padding=True, return_tensors="pt")
    with torch.no_grad():
        final = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()(**batch).pooler_output
        saved = AutoModel.from_pretrained(checkpoint / "model", trust_remote_code=True).eval()(**batch).pooler_output
    torch.testing.assert_close(saved, final, atol=0, rtol=0)


def test_processes_that_do_not_form_a_group_are_refused(tiny_bert, tiny_data, tmp_path):
    result = launch_two_processes(tiny_bert, tiny_data, tmp_path / "out", {})
    assert result.returncode != 0
    assert "2 processes were launched but Accelerate sees 1" in result.stderr + result.stdout
