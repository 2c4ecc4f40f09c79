import json
import math
import re
from pathlib import Path

import huggingface_hub
import numpy as np
import pandas as pd
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from conftest import COUNTED_TRAIN, TEXTS, counted_steps, torch_encoder, workspace_of
from safetensors.torch import load_file

from moebert.data.pairs import load_domain_datasets
from moebert.encoders.transformer import ShardedEncoder
from moebert.models import card as model_card
from moebert.models.builder import build_model
import moebert.models.hub
from moebert.names import default_base_model
from moebert.training import losses, recipes
from moebert.training import setup as training_setup
from moebert.training.batches import DomainBatchSampler, draw_hard_negatives, make_collate, training_pairs
from moebert.training.recipes import RECIPES
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
    loss = losses.multiple_negatives_ranking_loss(a, b, scale)
    assert loss.item() == pytest.approx((a_to_b + b_to_a) / 2, rel=1e-5)


def test_false_negatives_are_masked_out_of_the_loss():
    # texts: p, q, r, s; pairs (p,q) (r,p) (s,r): p sits in two pairs
    known = losses.KnownPairs(["p", "r", "s"], ["q", "p", "r"])
    ids_a, ids_b = torch.tensor(known.ids_a), torch.tensor(known.ids_b)
    a_to_b, b_to_a = known.masks(ids_a, ids_b)
    # a_to_b[i, j]: b_j is a's own text, b_i's text, or a known partner of a_i (j != i)
    # a0=p: b1=p (own text), b2=r (p-r co-cited); a1=r: b2=r (own text); a2=s: b1=p? no pair s-p -> kept
    assert a_to_b.tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    # b0=q: a1=r? no pair q-r; a2=s no. b1=p: a0=p own text; b2=r: a1=r own text, a0=p co-cited with r
    assert b_to_a.tolist() == [[False, False, False], [True, False, False], [True, True, False]]

    generator = torch.Generator().manual_seed(0)
    emb_a, emb_b = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    masked = losses.multiple_negatives_ranking_loss(emb_a, emb_b, 20.0, ignore=(a_to_b, b_to_a))
    cos_ab = torch.nn.functional.normalize(emb_a, dim=-1) @ torch.nn.functional.normalize(emb_b, dim=-1).T
    by_hand = 0.0
    for sim, mask in ((cos_ab, a_to_b), (cos_ab.T, b_to_a)):
        for i in range(3):
            kept = [j for j in range(3) if not mask[i, j]]
            by_hand += -(20 * sim[i, i] - torch.logsumexp(20 * sim[i, kept], 0)) / 6
    assert masked.item() == pytest.approx(by_hand.item(), rel=1e-5, abs=1e-6)  # float32 sums near 0


def test_hard_negatives_are_texts_of_the_domain_co_cited_with_neither_text():
    # domain X: p-q, q-r, s-t, u-v; domain Y: w-x, y-z
    known = losses.KnownPairs(list("pqsuwy"), list("qrtvxz"))
    domains = ["X"] * 4 + ["Y"] * 2
    text = dict(zip(known.ids_a + known.ids_b, list("pqsuwy") + list("qrtvxz")))
    partners = {"p": "q", "q": "pr", "r": "q", "s": "t", "t": "s", "u": "v", "v": "u", "w": "x", "x": "w", "y": "z", "z": "y"}
    for seed in range(5):
        drawn, short = draw_hard_negatives(known, domains, 2, seed)
        assert short == {}
        for (a, b, domain), hard in zip(zip("pqsuwy", "qrtvxz", domains), drawn):
            pool = set("pqrstuv") if domain == "X" else set("wxyz")
            allowed = pool - {a, b} - set(partners[a]) - set(partners[b])
            assert len(hard) == 2 and {text[i] for i in hard} <= allowed, (a, b, hard)
    # Y has 4 texts: a pair has only 2 true hard negatives; its third slot is a domain text that, when it is no
    # true hard negative, the masks leave out of the loss
    for seed in range(5):
        drawn, short = draw_hard_negatives(known, domains, 3, seed)
        assert short == {"Y": 2} and all(len(h) == 3 for h in drawn)
        ids_a, ids_b, ids_hard = (torch.tensor(x[4:]) for x in (known.ids_a, known.ids_b, drawn))
        a_to_b, _ = known.masks(ids_a, ids_b, ids_hard=ids_hard.flatten())
        for row, (a, b) in enumerate(zip("wy", "xz")):
            allowed = set("wxyz") - {a, b}
            for slot, i in enumerate(drawn[4 + row]):
                assert text[i] in allowed or a_to_b[row, 2 + 3 * row + slot], (a, b, text[i])


def test_hard_negatives_join_the_candidates_of_a_and_known_partners_are_masked():
    known = losses.KnownPairs(["p", "r", "q"], ["q", "s", "t"])  # pairs p-q, r-s, q-t
    ids_a, ids_b = torch.tensor(known.ids_a), torch.tensor(known.ids_b)
    text = dict(zip(known.ids_a + known.ids_b, "prqqst"))
    ids_hard = torch.tensor([known.ids_b[2], known.ids_a[1], known.ids_a[0]])  # hard negatives t, r, p
    assert [text[int(i)] for i in ids_hard] == ["t", "r", "p"]
    a_to_b, b_to_a = known.masks(ids_a, ids_b, ids_hard=ids_hard)
    # candidates of a: b = q, s, t, then hard = t, r, p. p: q own, t kept (p-t never co-cited), p itself masked;
    # r: s own, r itself masked; q: t own, t as hard is q's partner, p is q's partner (as b: q is p's positive)
    assert a_to_b.tolist() == [
        [False, False, False, False, False, True],
        [False, False, False, False, True, False],
        [True, False, False, True, False, True],
    ]
    torch.manual_seed(0)
    emb_a, emb_b, emb_hard = (torch.randn(3, 4, dtype=torch.float64) for _ in range(3))
    loss = losses.multiple_negatives_ranking_loss(emb_a, emb_b, 20.0, ignore=(a_to_b, b_to_a), emb_hard=emb_hard)
    n = torch.nn.functional.normalize
    logits_a = 20 * n(emb_a, dim=-1) @ n(torch.cat([emb_b, emb_hard]), dim=-1).T
    logits_a = logits_a.masked_fill(a_to_b, -torch.inf)
    logits_b = (20 * n(emb_b, dim=-1) @ n(emb_a, dim=-1).T).masked_fill(b_to_a, -torch.inf)
    by_hand = sum(-(logits[i, i] - torch.logsumexp(logits[i], 0)) for logits in (logits_a, logits_b) for i in range(3)) / 6
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize("dropout, hard_negatives", [(False, 0), (True, 0), (False, 1)])
def test_cached_loss_gives_the_gradients_of_the_whole_batch(tiny_bert, tiny_data, dropout, hard_negatives):
    from accelerate import Accelerator

    model, tokenizer = build_model(tiny_bert, ["CVD", "COPD"], RECIPES["quick"]["moe_layers"])
    model.train(dropout)
    datasets = load_domain_datasets({d: str(tiny_data / d) for d in ("CVD", "COPD")})
    pairs, known = training_pairs(datasets, ["CVD", "COPD"], hard_negatives)
    batch = make_collate(model, tokenizer, 32)([pairs[i] for i in range(len(pairs))])
    assert ("hard" in batch) == bool(hard_negatives)
    accelerator = Accelerator(cpu=True)

    def gradients(mini_batch_size, chunked_reference=False):
        model.zero_grad()
        torch.manual_seed(7)
        args = train.parse_args(["--recipe", "quick", "--cached_mini_batch_size", str(mini_batch_size or 0)])
        if chunked_reference:  # the same dropout draws as the cached step: a then b, mini-batch by mini-batch
            parts = [[model(**{k: v[rows] for k, v in batch[s].items()}, domain_ids=batch["domain_ids"][rows]).pooler_output
                      for s in ("a", "b")] for rows in torch.arange(8).split(mini_batch_size)]
            ignore = known.masks(batch["id_a"], batch["id_b"])
            loss = losses.multiple_negatives_ranking_loss(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                                         20.0, ignore=ignore)
            loss.backward()
        else:
            loss = losses.backward_step(model, batch, accelerator, known, args.scale, args.cached_mini_batch_size)
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference_loss, reference = gradients(3, chunked_reference=True) if dropout else gradients(None)
    cached_loss, cached = gradients(3)  # mini-batches of 3, 3 and 2 pairs
    assert cached_loss == pytest.approx(reference_loss, rel=1e-5)
    assert cached.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(cached[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_a_cached_step_on_the_cpu_leaves_cuda_alone_where_gpus_are_visible(tiny_bert, tiny_data, monkeypatch):
    from accelerate import Accelerator

    model, tokenizer = build_model(tiny_bert, ["CVD", "COPD"], RECIPES["quick"]["moe_layers"])
    pairs, known = training_pairs(load_domain_datasets({d: str(tiny_data / d) for d in ("CVD", "COPD")}), ["CVD", "COPD"])
    batch = make_collate(model, tokenizer, 32)([pairs[i] for i in range(len(pairs))])
    accelerator = Accelerator(cpu=True)  # CPU processes, as ACCELERATE_USE_CPU makes them on a GPU host

    def touched(*args, **kwargs):
        raise AssertionError("a CPU step touched CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, touched)
    model.train()
    assert losses.backward_step(model, batch, accelerator, known, 20.0, cached_mini_batch_size=3) > 0


def _gathered_loss_worker(rank, port, out):
    import os

    from accelerate import Accelerator

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ACCELERATE_USE_CPU="true")
    accelerator = Accelerator()
    torch.manual_seed(0)
    weight = torch.randn(6, 5)
    x_a, x_b = torch.randn(8, 6), torch.randn(8, 6)
    known = losses.KnownPairs(list("pqrstpuv"), list("qrpwxyzq"))  # repeated texts, across the two halves too
    ids_a, ids_b = torch.tensor(known.ids_a), torch.tensor(known.ids_b)

    def loss(rows, acc):
        w = weight.clone().requires_grad_()
        value = losses.multiple_negatives_ranking_loss(
            x_a[rows] @ w, x_b[rows] @ w, 20.0, acc, known.masks(ids_a[rows], ids_b[rows], acc)
        )
        value.backward()
        return value.detach(), w.grad

    full_loss, full_grad = loss(slice(0, 8), None)  # one process, the global batch
    local_loss, local_grad = loss(slice(4 * rank, 4 * rank + 4), accelerator)
    torch.distributed.all_reduce(local_loss)  # DDP averages the gradients, so do the losses
    torch.distributed.all_reduce(local_grad)
    torch.testing.assert_close(local_loss / 2, full_loss)
    torch.testing.assert_close(local_grad / 2, full_grad)
    (out / f"rank{rank}.ok").write_text("ok")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a group left to interpreter exit can abort the process


def test_two_process_loss_and_gradients_equal_one_process_on_the_global_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_gathered_loss_worker, args=(port, tmp_path), nprocs=2)
    assert {p.name for p in tmp_path.iterdir()} == {"rank0.ok", "rank1.ok"}


def run_train(tiny_bert, data, output_dir, *extra):
    return train.main(
        ["--recipe", "quick", "--model_name_or_path", tiny_bert, "--dataset", f"CVD={data / 'CVD'}", "--dataset", f"COPD={data / 'COPD'}",
         "--output_dir", str(output_dir), "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
         "--max_seq_length", "32", "--seed", "3", *extra]
    )


def test_training_lowers_the_loss_and_saves_a_loadable_model(tiny_bert, tiny_data, tmp_path):
    from transformers import AutoModel

    model, tokenizer = build_model(tiny_bert, ["CVD", "COPD"], RECIPES["quick"]["moe_layers"])
    collate = make_collate(model, tokenizer, 32)
    pairs, _ = training_pairs({"CVD": load_domain_datasets({"CVD": str(tiny_data / "CVD")})["CVD"]}, ["CVD", "COPD"])
    batch = collate([pairs[i] for i in range(len(pairs))])

    def loss():
        a = model(**batch["a"], domain_ids=batch["domain_ids"]).pooler_output
        b = model(**batch["b"], domain_ids=batch["domain_ids"]).pooler_output
        return losses.multiple_negatives_ranking_loss(a, b, 20.0)

    model.eval()  # no dropout: the comparison shows the step alone
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = loss()
    before.backward()
    optimizer.step()
    assert loss().item() < before.item()

    card = run_train(tiny_bert, tiny_data, tmp_path / "out", "--max_train_steps", "2")
    assert card.step == 2 and "f1_max" in card.metrics["all"]
    loaded = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert loaded.config.domains == ["CVD", "COPD"] and loaded.config.max_seq_length == 32


@pytest.mark.parametrize("base", ["tiny_bert", "tiny_mpnet", "tiny_roberta"])
def test_attention_dropout_reaches_every_attention_block_and_the_saved_config(base, tiny_bert, tiny_data, tmp_path,
                                                                              request):
    from transformers import AutoModel

    model, tokenizer = build_model(request.getfixturevalue(base), ["CVD", "COPD"], RECIPES["quick"]["moe_layers"])
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    training_setup.set_attention_dropout(model, 0.5)
    batch = tokenizer(model.prepend_domain_token(["heart failure trial"], ["CVD"]), return_tensors="pt")
    model.train()
    assert not torch.equal(model(**batch).last_hidden_state, model(**batch).last_hidden_state)
    training_setup.set_attention_dropout(model, 0.0)
    assert torch.equal(model(**batch).last_hidden_state, model(**batch).last_hidden_state)
    if base != "tiny_bert":
        return  # what train.py saves is the same for every kind

    run_train(tiny_bert, tiny_data, tmp_path / "out", "--max_train_steps", "1", "--attention_dropout", "0")
    assert AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).config.attention_probs_dropout_prob == 0


def test_every_domain_expert_is_written_as_its_own_file(tiny_bert, tiny_data, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from modeling_moebert import MoEBertModel

    run_train(tiny_bert, tiny_data, tmp_path / "out", "--max_train_steps", "2", "--checkpointing_steps", "2",
              "--no-train_experts_only", "--no-reuse_stem_states", "--no-select_experts_per_domain")
    out = tmp_path / "out"
    for folder in (out, workspace_of(out) / "checkpoint-2" / "model", workspace_of(out) / "best_model"):
        assert sorted(p.name for p in (folder / "experts").iterdir()) == ["COPD.safetensors", "CVD.safetensors"]
    trained = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    # the untrained base with the CVD expert file (and the trained shared weights) computes the trained model's CVD
    fresh = MoEBertModel.from_bert(tiny_bert, domains=["CVD", "COPD"], moe_layers="top2")[0].eval()
    fresh.load_state_dict({k: v for k, v in trained.state_dict().items() if ".experts." not in k}, strict=False)
    fresh.load_expert(out / "experts" / "CVD.safetensors", tokenizer=tokenizer)
    batch = tokenizer(["[CVD] " + TEXTS[0]], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).pooler_output, trained(**batch).pooler_output, atol=1e-6, rtol=0)


@pytest.mark.parametrize("resume_from, accumulation", [("latest", "1"), ("last-checkpoint", "1"), ("latest", "2")])
def test_kill_and_resume_reaches_the_same_weights(tiny_bert, tiny_data, tmp_path, resume_from, accumulation,
                                                  optimizer_steps, capsys):
    import shutil

    checkpointing = ["--checkpointing_steps", "1", "--checkpoints_total_limit", "0", "--gradient_accumulation_steps",
                     accumulation]
    run_train(tiny_bert, tiny_data, tmp_path / "straight", "--max_train_steps", "4", *checkpointing)
    straight_steps = list(optimizer_steps)
    assert len(straight_steps) == 4
    run_train(tiny_bert, tiny_data, tmp_path / "resumed", "--max_train_steps", "4", *checkpointing)
    shutil.rmtree(tmp_path / "resumed")  # the final model
    optimizer_steps.clear()
    if resume_from == "latest":  # as if killed right after the checkpoint of step 1 (mid-epoch: 2 batches per epoch)
        for later in (2, 3, 4):
            shutil.rmtree(tmp_path / "resumed-workspace" / f"checkpoint-{later}")
    else:  # step 1's checkpoint as the Hub keeps it (--hub_strategy checkpoint); the rerun rewrites checkpoint-2..4
        resume_from = str(shutil.copytree(tmp_path / "resumed-workspace" / "checkpoint-1",
                                          tmp_path / "hub" / "last-checkpoint"))
    capsys.readouterr()
    card = run_train(tiny_bert, tiny_data, tmp_path / "resumed", "--max_train_steps", "4", *checkpointing,
                     "--resume_from_checkpoint", resume_from)
    assert card.step == 4
    # it really resumed: three optimizer steps, at the learning rates the uninterrupted run had at steps 2 to 4
    assert optimizer_steps == pytest.approx(straight_steps[1:], rel=1e-9)
    printed = capsys.readouterr().out
    assert f"at step 1, learning rate {straight_steps[1]:.6e}" in printed and "trained steps 2..4 in this run" in printed
    straight_state = json.loads((tmp_path / "straight" / "training_state.json").read_text())
    assert card.best == straight_state["best"]  # the best-model record travelled with the checkpoint
    for name in ("model.safetensors", "-workspace/checkpoint-4/model/model.safetensors"):  # assembled; the last step
        straight = load_file(f"{tmp_path / 'straight'}{'/' if name[0] != '-' else ''}{name}")
        resumed = load_file(f"{tmp_path / 'resumed'}{'/' if name[0] != '-' else ''}{name}")
        for key, tensor in straight.items():
            torch.testing.assert_close(resumed[key], tensor, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")
    assert not [p.name for p in tmp_path.rglob("*") if p.name.startswith((".tmp", ".old"))]


def test_resuming_from_a_folder_that_is_no_checkpoint_says_so(tiny_bert, tiny_data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=rf"^error: --resume_from_checkpoint {re.escape(str(tmp_path / 'empty'))}: not a "
                                         r"checkpoint written by train.py \(no model/training_state.json\); give a "
                                         r"checkpoint-<step>/ folder, a downloaded last-checkpoint/, or 'latest'\.$"):
        run_train(tiny_bert, tiny_data, tmp_path / "out", "--resume_from_checkpoint", str(tmp_path / "empty"))
    # a restart script's first run: nothing to resume yet, and it says so
    card = run_train(tiny_bert, tiny_data, tmp_path / "out", "--resume_from_checkpoint", "latest", "--max_train_steps", "1")
    assert card.step == 1
    assert f"no checkpoint-<step>/ in {tmp_path / 'out-workspace'} yet, starting at step 0" in capsys.readouterr().out


def test_a_run_killed_mid_training_resumes_to_the_same_weights(tiny_bert, tiny_data, tmp_path, optimizer_steps):
    import signal
    import subprocess
    import sys
    import time

    steps = ["--max_train_steps", "30", "--checkpointing_steps", "1", "--checkpoints_total_limit", "3"]
    run_train(tiny_bert, tiny_data, tmp_path / "straight", *steps)
    straight_steps = list(optimizer_steps)
    optimizer_steps.clear()
    killed = tmp_path / "killed"
    command = [sys.executable, train.__file__, "--recipe", "quick", "--model_name_or_path", tiny_bert, "--dataset", f"CVD={tiny_data / 'CVD'}",
               "--dataset", f"COPD={tiny_data / 'COPD'}", "--output_dir", str(killed), "--per_device_train_batch_size",
               "4", "--learning_rate", "1e-3", "--max_seq_length", "32", "--seed", "3", *steps]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (workspace_of(killed) / "checkpoint-3").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "model.safetensors").exists()

    card = run_train(tiny_bert, tiny_data, killed, *steps, "--resume_from_checkpoint", "latest")
    assert card.step == 30
    resumed_at = 30 - len(optimizer_steps)  # the newest checkpoint the kill left: step 3 or later
    assert resumed_at >= 3
    assert optimizer_steps == pytest.approx(straight_steps[resumed_at:], rel=1e-9)
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(killed / "model.safetensors")
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_malformed_data_is_refused_before_training(tiny_bert, tmp_path):
    folder = tmp_path / "bad" / "CVD"
    folder.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        pd.DataFrame({"a": ["x"], "text_b": ["y"], "label": [1]}).to_csv(folder / f"{split}.csv", index=False)
    with pytest.raises(SystemExit, match=r"lacks columns \['b'\]"):
        train.main(["--recipe", "quick", "--model_name_or_path", tiny_bert, "--dataset", f"CVD={folder}", "--output_dir", str(tmp_path / "o")])


def launch_two_processes(tiny_bert, tiny_data, output_dir, env, *extra):
    """train.py in two processes (counted_train.py: each records its optimizer steps in COUNTED_STEPS.<rank>)."""
    import os
    import subprocess
    import sys

    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", "29533", str(COUNTED_TRAIN), "--recipe", "quick", "--model_name_or_path", tiny_bert,
        "--dataset", f"CVD={tiny_data / 'CVD'}", "--dataset", f"COPD={tiny_data / 'COPD'}",
        "--per_device_train_batch_size", "2", "--max_seq_length", "32", "--max_train_steps", "2",
        "--checkpointing_steps", "1", "--output_dir", str(output_dir), "--batching", "domain",  # one expert idle
        "--cached_mini_batch_size", "1", *extra,
    ]
    environment = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"} | {"HF_HUB_OFFLINE": "1"}
    environment |= {"COUNTED_STEPS": str(output_dir.parent / "steps")} | env
    return subprocess.run(command, env=environment, capture_output=True, text=True)


def test_two_process_cpu_run_saves_checkpoints_that_automodel_loads(tiny_bert, tiny_data, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    result = launch_two_processes(tiny_bert, tiny_data, tmp_path / "out", {"ACCELERATE_USE_CPU": "true"},
                                  "--no-select_experts_per_domain",  # the final model is then the last step's
                                  "--per_device_train_batch_size", "3")  # 4 pairs a domain: one smaller batch each
    assert result.returncode == 0, result.stderr[-3000:]
    # the library's message about it comes once, from the main process, though both processes build the sampler
    assert result.stderr.count("have fewer train pairs") == 1 and "[RANK 0] --batching domain: " in result.stderr
    checkpoint = tmp_path / "out-workspace" / "checkpoint-2"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=True)
    batch = tokenizer(["[CVD] " + TEXTS[0], "[COPD] " + TEXTS[1]], padding=True, return_tensors="pt")
    with torch.no_grad():
        final = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()(**batch).pooler_output
        saved = AutoModel.from_pretrained(checkpoint / "model", trust_remote_code=True).eval()(**batch).pooler_output
    torch.testing.assert_close(saved, final, atol=0, rtol=0)


def test_two_processes_resume_where_their_checkpoint_stopped(tiny_bert, tiny_data, tmp_path):
    import re
    import shutil

    use_cpu = {"ACCELERATE_USE_CPU": "true"}
    steps = ("--max_train_steps", "3", "--checkpoints_total_limit", "0", "--no-select_experts_per_domain")
    straight = launch_two_processes(tiny_bert, tiny_data, tmp_path / "out", use_cpu | {"COUNTED_STEPS": str(
        tmp_path / "straight")}, *steps)
    assert straight.returncode == 0, straight.stderr[-3000:]
    straight_steps = [counted_steps(tmp_path / "straight", rank) for rank in (0, 1)]
    assert [len(s) for s in straight_steps] == [3, 3] and "trained steps 1..3" in straight.stdout
    final = load_file(tmp_path / "out" / "model.safetensors")
    for later in ("out-workspace/checkpoint-2", "out-workspace/checkpoint-3", "out"):  # killed after step 1's checkpoint
        shutil.rmtree(tmp_path / later)
    resumed = launch_two_processes(tiny_bert, tiny_data, tmp_path / "out", use_cpu | {"COUNTED_STEPS": str(
        tmp_path / "resumed")}, *steps, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # each process took exactly the two remaining steps, at the uninterrupted run's learning rates
    for rank in (0, 1):
        assert counted_steps(tmp_path / "resumed", rank) == pytest.approx(straight_steps[rank][1:], rel=1e-9)
    learning_rate = re.search(r"at step 1, learning rate (\S+)", resumed.stdout)
    assert learning_rate and float(learning_rate[1]) == pytest.approx(straight_steps[0][1], rel=1e-6)
    assert "trained steps 2..3 in this run" in resumed.stdout
    for key, tensor in load_file(tmp_path / "out" / "model.safetensors").items():  # the last step's weights
        torch.testing.assert_close(tensor, final[key], atol=1e-5, rtol=1e-4, msg=key)


def test_processes_that_do_not_form_a_group_are_refused(tiny_bert, tiny_data, tmp_path):
    # a machine without GPUs (on a GPU host, --multi_gpu processes would form an NCCL group on the GPUs)
    result = launch_two_processes(tiny_bert, tiny_data, tmp_path / "out", {"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode != 0
    assert "2 processes were launched but Accelerate sees 1" in result.stderr + result.stdout


def test_domain_batches_hold_one_domain_per_global_batch(caplog):
    from accelerate import PartialState

    PartialState(cpu=True)  # the training modules log through accelerate, as under train.py
    caplog.set_level("INFO", logger="moebert")
    domain_ids = [0] * 10 + [1] * 7 + [2] * 4
    sampler = DomainBatchSampler(domain_ids, batch_size=2, num_processes=2, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 8  # global batches of 4: two of domain 0, one each of 1 and 2
    for first, second in zip(batches[::2], batches[1::2]):  # process 0 and 1 get consecutive batches
        assert len({domain_ids[i] for i in first + second}) == 1
    indices = [i for batch in batches for i in batch]
    assert len(indices) == len(set(indices)) == 16
    assert list(sampler) == batches  # the same epoch gives the same order
    sampler.set_epoch(1)
    assert list(sampler) != batches
    # global batches of 8: domain 0 gives one, domains 1 and 2 have fewer pairs and give one smaller batch each
    # (6 of domain 1's 7, a multiple of the 2 processes; all 4 of domain 2), and the run says so
    sampler = DomainBatchSampler(domain_ids, batch_size=4, num_processes=2, seed=1)
    assert "domain ids [1, 2] have fewer train pairs ([7, 4]) than one global batch (4 x 2 processes)" in caplog.text
    batches = list(sampler)
    assert sorted(len(b) for b in batches) == [2, 2, 3, 3, 4, 4] and len(sampler) == 6
    for first, second in zip(batches[::2], batches[1::2]):
        assert len(first) == len(second) and len({domain_ids[i] for i in first + second}) == 1
    # accelerate deals them out as they come, the smaller ones too: each process its share, the same count
    for rank in (0, 1):
        for even in (True, False):
            shard = BatchSamplerShard(sampler, num_processes=2, process_index=rank, even_batches=even)
            assert list(shard) == batches[rank::2] and len(shard) == 3


def test_domain_sampling_alpha_shares_the_epoch_by_pairs_to_that_power():
    domain_ids = [0] * 64 + [1] * 16 + [2] * 4  # 32, 8 and 2 batches of 2 in one pass
    by_domain = lambda sampler: np.bincount([domain_ids[b[0]] for b in sampler], minlength=3).tolist()  # noqa: E731
    one_pass = DomainBatchSampler(domain_ids, batch_size=2, num_processes=1, seed=3, alpha=1.0)
    assert by_domain(one_pass) == [32, 8, 2] and len(one_pass) == 42
    # alpha 1 is the proportional order, draw for draw (a run without the flag keeps its batches)
    rng = np.random.default_rng([3, 0])
    groups = [rng.permutation(np.flatnonzero(np.array(domain_ids) == d)) for d in range(3)]
    expected = [g[i : i + 2].tolist() for g in groups for i in range(0, len(g), 2)]
    assert list(one_pass) == [expected[i] for i in rng.permutation(42)]
    uneven = [0] * 31 + [1] * 3 + [2] * 3  # shares by pairs would round domain 0 down to 14 of the 17 batches
    assert len(DomainBatchSampler(uneven, batch_size=2, num_processes=1, seed=3, alpha=1.0)) == 17
    # alpha 0.5: shares 8 : 4 : 2 of the same 42 batches; the smallest domain's 4 pairs come round 3 times
    balanced = DomainBatchSampler(domain_ids, batch_size=2, num_processes=1, seed=3, alpha=0.5)
    batches = list(balanced)
    assert by_domain(batches) == [24, 12, 6] and len(balanced) == len(batches) == 42
    assert all(len(set(b)) == 2 for b in batches)  # a repeated pair never meets itself in a batch
    smallest = [i for b in batches if domain_ids[b[0]] == 2 for i in b]
    assert sorted(smallest) == sorted(list(range(80, 84)) * 3)
    large = [i for b in batches if domain_ids[b[0]] == 0 for i in b]
    assert len(set(large)) == len(large) == 48  # a large domain sees a share of its pairs, none twice
    # alpha 0: every domain the same number of batches
    assert by_domain(DomainBatchSampler(domain_ids, batch_size=2, num_processes=1, seed=3, alpha=0.0)) == [14, 14, 14]


def test_training_experts_only_leaves_shared_weights_unchanged(tiny_bert, tiny_data, tmp_path):
    from modeling_moebert import MoEBertModel

    run_train(tiny_bert, tiny_data, tmp_path / "out", "--max_train_steps", "2", "--train_experts_only",
              "--no-select_experts_per_domain")  # every expert then holds its last step
    start = MoEBertModel.from_bert(tiny_bert, domains=["CVD", "COPD"], moe_layers="top2")[0].state_dict()
    trained = load_file(tmp_path / "out" / "model.safetensors")
    experts = [name for name in trained if ".experts." in name]
    assert experts and all(not torch.equal(trained[name], start[name]) for name in experts)
    for name in set(trained) - set(experts):
        torch.testing.assert_close(trained[name], start[name], atol=0, rtol=0, msg=name)


def test_continuing_a_checkpoint_trains_each_domain_on_its_own_expert(tiny_bert, tiny_data, tmp_path):
    from modeling_moebert import MoEBertModel

    model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=["CVD", "COPD"])
    model.save_pretrained(tmp_path / "start")
    tokenizer.save_pretrained(tmp_path / "start")
    # COPD alone, the checkpoint's second domain: its pairs must reach expert 1, never expert 0 (CVD)
    train.main(["--recipe", "quick", "--model_name_or_path", str(tmp_path / "start"), "--dataset", f"COPD={tiny_data / 'COPD'}",
                "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                "--max_seq_length", "32", "--max_train_steps", "2", "--no-select_experts_per_domain"])
    start, trained = model.state_dict(), load_file(tmp_path / "out" / "model.safetensors")
    for name in (n for n in trained if ".experts." in n):
        same = torch.equal(trained[name], start[name])
        assert same == (".experts.0." in name), name


@pytest.mark.parametrize("routing_mode", ["sentence", "token"])
def test_train_and_eval_route_each_domain_to_its_own_expert(tiny_bert, tiny_data, tmp_path, routing_mode):
    from modeling_moebert import MoEBertModel

    upcycled, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=["CVD", "COPD"], routing_mode=routing_mode,
                                                 moe_layers="top2")
    upcycled.save_pretrained(tmp_path / "start")
    tokenizer.save_pretrained(tmp_path / "start")
    run_train(str(tmp_path / "start"), tiny_data, tmp_path / "out", "--max_train_steps", "2",
              "--no-select_experts_per_domain")
    start = upcycled.state_dict()
    trained = load_file(tmp_path / "out" / "model.safetensors")
    # domain batches: one step per domain, each on its own expert (all-zero segments would train expert 0 twice)
    assert all(not torch.equal(trained[k], start[k]) for k in trained if ".experts." in k)
    encoder = torch_encoder(tmp_path / "out", 32, 4)
    assert encoder.model.config.routing_mode == routing_mode
    with torch.no_grad():
        for d, domain in enumerate(("CVD", "COPD")):
            batch = encoder.tokenizer([f"[{domain}] {TEXTS[0]}"], return_tensors="pt")
            expected = encoder.model(**batch, domain_ids=torch.tensor([d])).pooler_output[0].numpy()
            np.testing.assert_allclose(encoder.encode([TEXTS[0]], domain)[0], expected, atol=1e-5)
    vectors = [encoder.encode([TEXTS[0]], domain)[0] for domain in ("CVD", "COPD")]
    assert not np.allclose(*vectors, atol=1e-4)  # two experts, two embeddings


def test_best_model_is_kept_and_training_stops_when_valid_stops_improving(tiny_bert, tiny_data, tmp_path, monkeypatch):
    scores = iter([0.50, 0.60, 0.55, 0.52, 0.90, 0.90])  # steps 0 (untrained), 1, 2, 3, ...
    monkeypatch.setattr(train, "validate", lambda *args: ({"mean": {"roc_auc": next(scores)}, "all": {}}, {}))
    out = tmp_path / "out"
    card = run_train(tiny_bert, tiny_data, out, "--max_train_steps", "6", "--eval_steps", "1", "--checkpointing_steps",
                     "1", "--checkpoints_total_limit", "0", "--early_stopping_patience", "2", "--load_best_model_at_end",
                     "--no-select_experts_per_domain")
    assert card.step == 3  # steps 2 and 3 did not beat step 1
    assert card.best == {"metric": "roc_auc", "value": 0.60, "step": 1, "stale": 2}
    workspace = workspace_of(out)
    assert sorted(p.name for p in workspace.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    final = load_file(out / "model.safetensors")
    for name, tensor in load_file(workspace / "checkpoint-1" / "model" / "model.safetensors").items():
        torch.testing.assert_close(final[name], tensor, atol=0, rtol=0)
    assert any(not torch.equal(final[n], t) for n, t in load_file(workspace / "checkpoint-3/model/model.safetensors").items())
    assert json.loads((workspace / "best_model" / "training_state.json").read_text())["step"] == 1


def run_train_process(tiny_bert, tiny_data, output_dir, hub, *extra):
    import os
    import subprocess
    import sys

    command = [
        sys.executable, str(Path(train.__file__)), "--recipe", "quick", "--model_name_or_path", tiny_bert,
        "--dataset", f"CVD={tiny_data / 'CVD'}", "--dataset", f"COPD={tiny_data / 'COPD'}",
        "--per_device_train_batch_size", "4", "--max_seq_length", "32", "--max_train_steps", "2",
        "--output_dir", str(output_dir), "--push_to_hub", "--hub_model_id", "lab/moebert-test", *extra,
    ]
    env = os.environ | {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_test",
                        "HF_HOME": str(output_dir.parent / "hf-home")}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_push_to_hub_sends_a_loadable_model_and_the_latest_checkpoint(tiny_bert, tiny_data, tmp_path):
    from fake_hub import FakeHub
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "out"
    with FakeHub() as hub:
        result = run_train_process(tiny_bert, tiny_data, out, hub, "--hub_strategy", "checkpoint",
                                   "--checkpointing_steps", "1", "--hub_private_repo", "--hub_token", "hf_secret")
    assert result.returncode == 0, result.stderr[-3000:]
    assert hub.authorizations == {"Bearer hf_secret"}
    repo = hub.repos["lab/moebert-test"]
    assert repo["private"]
    files = repo["files"]
    root = {name for name in files if "/" not in name}
    assert {"config.json", "model.safetensors", "modeling_moebert.py", "configuration_moebert.py", "tokenizer.json",
            "README.md", "training_state.json"} <= root
    assert {"experts/CVD.safetensors", "experts/COPD.safetensors"} <= root | {n for n in files if n.startswith("experts/")}
    assert {"last-checkpoint/model.safetensors", "last-checkpoint/optimizer.bin", "last-checkpoint/model/config.json",
            "last-checkpoint/model/experts/COPD.safetensors"} <= set(files)
    assert not any(name.startswith(("checkpoint-", ".", "best_model")) for name in files)
    assert not any(b"hf_secret" in content for content in files.values())  # the token is not published
    assert hub.commits[-1]["summary"] in ("End of training", "Checkpoint at step 2")
    for name in root:  # the root of the repo is the final model, byte for byte
        assert files[name] == (out / name).read_bytes(), name
    assert not any((workspace_of(out) / "hub-uploads").iterdir())  # snapshots removed after upload
    model_entries = {name.split("/")[0] for name in files if not name.startswith("last-checkpoint/")}
    assert {p.name for p in out.iterdir()} == model_entries  # the model folder holds the model only, all pushed

    downloaded = tmp_path / "downloaded"
    for name, content in files.items():
        if not name.startswith("last-checkpoint/"):
            (downloaded / name).parent.mkdir(parents=True, exist_ok=True)
            (downloaded / name).write_bytes(content)
    tokenizer = AutoTokenizer.from_pretrained(downloaded, trust_remote_code=True)
    batch = tokenizer(["[CVD] " + TEXTS[0]], return_tensors="pt")
    with torch.no_grad():
        pushed = AutoModel.from_pretrained(downloaded, trust_remote_code=True).eval()(**batch).pooler_output
        local = AutoModel.from_pretrained(out, trust_remote_code=True).eval()(**batch).pooler_output
    torch.testing.assert_close(pushed, local, atol=0, rtol=0)


def test_a_failing_hub_costs_nothing_local(tiny_bert, tiny_data, tmp_path):
    from fake_hub import FakeHub
    from transformers import AutoModel

    out = tmp_path / "out"
    with FakeHub(fail=True) as hub:
        result = run_train_process(tiny_bert, tiny_data, out, hub, "--checkpointing_steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed 3 times" in result.stderr and "The local copy in" in result.stderr
    assert "pushed to" not in result.stderr and "pushes to lab/moebert-test did not arrive" in result.stderr
    pushes_tried = result.stderr.count("failed 3 times")  # a push that waited is replaced by a newer one, untried
    assert pushes_tried >= 1 and hub.requests.count(("POST", "/api/repos/create")) == 3 * pushes_tried  # each 3 times
    assert {"checkpoint-1", "checkpoint-2"} <= {p.name for p in workspace_of(out).iterdir()}
    AutoModel.from_pretrained(out, trust_remote_code=True)


def test_each_recipe_is_its_values_and_a_flag_given_over_it_wins_and_is_recorded():
    for name, values in recipes.RECIPES.items():
        args = train.parse_args(["--recipe", name])
        assert {k: getattr(args, k) for k in values if k != "mixed_precision"} == {
            k: v for k, v in values.items() if k != "mixed_precision"}
        assert args.recipe_record == {"name": name, "reason": "asked for with --recipe", "flags": {}}
    tuned = train.parse_args(["--recipe", "full", "--learning_rate", "1e-5", "--train_experts_only", "--max_train_steps",
                              "9"])
    assert (tuned.learning_rate, tuned.train_experts_only, tuned.max_train_steps, tuned.reuse_stem_states) == (
        1e-5, True, 9, False)  # the recipe's other values stay: no value follows another flag
    assert tuned.recipe_record["flags"] == {"learning_rate": 1e-5, "train_experts_only": True, "max_train_steps": 9}
    assert recipes.describe(tuned.recipe_record) == ("recipe full: asked for with --recipe; given over it: "
                                                     "--max_train_steps 9 --learning_rate 1e-05 --train_experts_only True")
    epochs = train.parse_args(["--recipe", "quick", "--num_train_epochs", "2"])  # a length in epochs replaces 750 steps
    assert (epochs.num_train_epochs, epochs.max_train_steps) == (2, None)


@pytest.mark.parametrize("cuda, mps, use_cpu, recipe", [
    (False, False, "", "quick"), (True, False, "", "full"), (False, True, "", "full"), (True, False, "true", "quick"),
])
def test_the_recipe_follows_the_device(monkeypatch, cuda, mps, use_cpu, recipe):
    monkeypatch.setattr(recipes.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(recipes.torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(recipes.torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setenv("ACCELERATE_USE_CPU", use_cpu)
    monkeypatch.setattr(train, "bf16_is_native", lambda device: device == "cuda")  # no real CUDA to ask; a CPU without
    args = train.parse_args([])
    assert args.recipe == recipe
    # CPU processes on a GPU host (ACCELERATE_USE_CPU) run at the CPU's precision, not the GPU's bf16
    assert args.mixed_precision == ("bf16" if recipe == "full" else "no")
    expected = {"quick": "no CUDA or MPS" if not use_cpu else "ACCELERATE_USE_CPU", "full": "Fake GPU" if cuda else "MPS"}
    assert expected[recipe] in args.recipe_record["reason"]
    assert (args.train_experts_only, args.num_train_epochs) == ((True, None) if recipe == "quick" else (False, 1))
    assert train.parse_args(["--recipe", "quick"]).recipe == "quick"  # forced either way
    assert train.parse_args(["--recipe", "full"]).recipe == "full"


@pytest.mark.parametrize("native", [True, False])
def test_the_quick_recipe_uses_bf16_only_where_it_is_native(monkeypatch, native):
    monkeypatch.setattr(train, "bf16_is_native", lambda device: native)
    assert train.parse_args(["--recipe", "quick"]).mixed_precision == ("bf16" if native else "no")
    assert train.parse_args(["--recipe", "quick", "--mixed_precision", "no"]).mixed_precision == "no"


@pytest.mark.parametrize("flags, fix", [
    (["--no-train_experts_only"], "add --no-reuse_stem_states --no-select_experts_per_domain, or use --recipe full"),
    (["--shared_expert"], "--shared_expert: per-domain expert selection (recipe quick) needs one expert per domain"),
    (["--load_best_model_at_end"], "picks the final model itself; add --no-select_experts_per_domain"),
])
def test_settings_that_cannot_go_together_are_refused_with_the_flags_that_fix_them(flags, fix, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--recipe", "quick", *flags])
    assert fix in capsys.readouterr().err
    fixed = train.parse_args(["--recipe", "quick", *flags, "--no-select_experts_per_domain", "--no-reuse_stem_states"])
    assert not fixed.select_experts_per_domain and not fixed.reuse_stem_states


@pytest.mark.parametrize("flags, refusal", [
    (["--batching", "mixed", "--domain_sampling_alpha", "0.5"],
     "--batching mixed has no per-domain batches to share by --domain_sampling_alpha 0.5 (recipe quick): add "
     "--domain_sampling_alpha 1"),
    (["--domain_sampling_alpha", "-0.5"], "--domain_sampling_alpha -0.5: give 0 or more"),
    (["--domain_sampling_alpha", "nan"], "--domain_sampling_alpha nan: give 0 or more"),
])
def test_a_domain_sampling_that_cannot_apply_is_refused(flags, refusal, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--recipe", "quick", *flags])
    assert refusal in capsys.readouterr().err
    assert train.parse_args(["--recipe", "quick", "--batching", "mixed", "--domain_sampling_alpha", "1"]).batching == "mixed"
    assert train.parse_args(["--recipe", "quick", "--domain_sampling_alpha", "0"]).domain_sampling_alpha == 0


def test_the_final_model_is_assembled_from_each_domains_best_expert(tiny_bert, tiny_data, tmp_path, monkeypatch, capsys):
    from modeling_moebert import MoEBertModel

    # valid ROC-AUC per evaluation (steps 0..4, then the assembled model): CVD peaks at step 2, COPD never beats step 0
    scores = iter([(0.5, 0.5), (0.6, 0.4), (0.7, 0.45), (0.65, 0.3), (0.62, 0.2), (0.7, 0.5)])

    def validate(*args):  # the metrics, and no scores to fit a calibration on
        cvd, copd = next(scores)
        return {"CVD": {"roc_auc": cvd}, "COPD": {"roc_auc": copd}, "mean": {"roc_auc": (cvd + copd) / 2}, "all": {}}, {}

    monkeypatch.setattr(train, "validate", validate)
    out = tmp_path / "out"
    card = run_train(tiny_bert, tiny_data, out, "--max_train_steps", "4", "--eval_steps", "1",
                     "--checkpointing_steps", "1", "--checkpoints_total_limit", "0")
    assert capsys.readouterr().out.startswith("recipe quick: ")  # the first printed line names the recipe
    assert card.expert_selection["kept"] == {"CVD": {"value": 0.7, "step": 2}, "COPD": {"value": 0.5, "step": 0}}
    assert card.metrics["mean"]["roc_auc"] == 0.6  # the assembled model was scored again
    assert "CVD: step 2 (0.7000), COPD: step 0 (0.5000)" in (out / "README.md").read_text()

    def model_at(folder):
        return load_file(folder / "model.safetensors")

    start = MoEBertModel.from_bert(tiny_bert, domains=["CVD", "COPD"], moe_layers="top2")[0].state_dict()
    final = model_at(out)
    step2, step4 = (model_at(workspace_of(out) / f"checkpoint-{step}" / "model") for step in (2, 4))
    for key, tensor in final.items():
        expected = step2 if ".experts.0." in key else start  # CVD is expert 0; COPD and the shared weights: untrained
        torch.testing.assert_close(tensor, expected[key], atol=0, rtol=0, msg=key)
    trained = [k for k in final if ".experts." in k]
    assert trained and all(not torch.equal(final[k], step4[k]) for k in trained)  # the last step's experts were not kept


def test_push_to_hub_needs_a_repo_id_and_the_network(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--recipe", "quick", "--push_to_hub"])
    assert "--push_to_hub needs --hub_model_id ORG/NAME" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit):
        train.parse_args(["--recipe", "quick", "--push_to_hub", "--hub_model_id", "lab/x"])
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def logged(caplog) -> tuple[str, str]:
    """(the library's messages below warning, its warnings) so far: what show_logs writes to stderr."""
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("moebert")]
    return ("\n".join(m for level, m in said if level < 30), "\n".join(m for level, m in said if level >= 30))


@pytest.fixture
def hub_log(caplog):
    caplog.set_level("INFO", logger="moebert")
    return caplog


@pytest.mark.parametrize("failures", [2, 5])
def test_a_failing_push_is_tried_three_times_and_reported_with_what_happened(tmp_path, hub_log, failures):
    pusher = moebert.models.hub.HubPusher("lab/moebert-test", tmp_path / "staging", backoff_s=0)
    calls = {"create": 0, "upload": 0}

    def create_repo(*args, **kwargs):
        calls["create"] += 1
        if calls["create"] <= failures:
            raise ConnectionError("network is unreachable")

    def upload_folder(**kwargs):
        calls["upload"] += 1

    pusher.api.create_repo, pusher.api.upload_folder = create_repo, upload_folder
    (tmp_path / "model.safetensors").write_text("step 1")
    pusher.push(tmp_path, "", "step 1", ["model.safetensors"])
    pusher.finish()
    out, err = logged(hub_log)
    if failures == 2:  # the third try goes through
        assert calls == {"create": 3, "upload": 1} and "warning" not in err and "pushed to" in out
    else:
        assert calls == {"create": 3, "upload": 0} and "pushed to" not in out
        assert "pushing 'step 1' to the Hub repo lab/moebert-test failed 3 times (ConnectionError: network is " \
               "unreachable)" in err
    assert (tmp_path / "model.safetensors").read_text() == "step 1"


def test_a_push_that_cannot_be_staged_is_skipped_not_fatal(tmp_path, hub_log):
    pusher = moebert.models.hub.HubPusher("lab/moebert-test", tmp_path / "staging")
    pusher.push(tmp_path, "", "step 1", ["no-such-file.safetensors"])  # raises nothing
    pusher.finish()
    out, err = logged(hub_log)
    assert "not pushing 'step 1': cannot stage" in err and "1 pushes to lab/moebert-test did not arrive" in err
    assert "pushed to" not in out
    assert not list((tmp_path / "staging").glob("*"))


def test_a_newer_push_replaces_one_still_waiting_and_snapshots_are_removed(tmp_path):
    import threading

    pusher = moebert.models.hub.HubPusher("lab/moebert-test", tmp_path / "staging")
    started, release, sent = threading.Event(), threading.Event(), []

    def upload_folder(folder_path, commit_message, **kwargs):
        sent.append((commit_message, sorted(p.name for p in Path(folder_path).iterdir())))
        started.set()
        release.wait(10)

    pusher.api.create_repo = lambda *args, **kwargs: None
    pusher.api.upload_folder = upload_folder
    for step in (1, 2, 3):
        (tmp_path / "model.safetensors").write_text(f"step {step}")
        pusher.push(tmp_path, "last-checkpoint", f"step {step}", ["model.safetensors"])
        started.wait(10)  # step 1 is uploading; step 2 then waits behind it, and step 3 replaces it
    release.set()
    pusher.finish()
    assert [message for message, _ in sent] == ["step 1", "step 3"]
    assert not list((tmp_path / "staging").iterdir())
    assert (tmp_path / "model.safetensors").read_text() == "step 3"  # local files untouched


def test_after_a_stop_queued_uploads_are_awaited_for_a_bounded_time(tmp_path, hub_log):
    import threading
    import time

    pusher = moebert.models.hub.HubPusher("lab/moebert-test", tmp_path / "staging")
    release = threading.Event()
    pusher.api.create_repo = lambda *args, **kwargs: None
    pusher.api.upload_folder = lambda **kwargs: release.wait(30)  # a network that hangs
    (tmp_path / "model.safetensors").write_text("step 1")
    pusher.push(tmp_path, "", "step 1", ["model.safetensors"])
    started = time.monotonic()
    pusher.finish(completed=False, timeout=0.5)
    assert time.monotonic() - started < 5  # it did not wait for the hung upload
    assert "1 uploads to lab/moebert-test were still under way after 0.5 s and are abandoned" in logged(hub_log)[1]
    release.set()


def test_uploads_queued_before_a_crash_are_still_sent(tiny_bert, tiny_data, tmp_path, monkeypatch, capsys):
    from fake_hub import FakeHub

    step = train.backward_step

    def crash_on_the_second_step(*args, **kwargs):
        crash_on_the_second_step.calls += 1
        if crash_on_the_second_step.calls == 2:
            raise RuntimeError("out of memory, say")
        return step(*args, **kwargs)

    crash_on_the_second_step.calls = 0
    with FakeHub() as hub:
        hf_api = moebert.models.hub.HfApi
        monkeypatch.setattr(moebert.models.hub, "HfApi", lambda token=None: hf_api(endpoint=hub.endpoint, token=token))
        monkeypatch.setattr(train, "backward_step", crash_on_the_second_step)  # after step 1's checkpoint is queued
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        with pytest.raises(RuntimeError, match="out of memory"):
            run_train(tiny_bert, tiny_data, tmp_path / "out", "--max_train_steps", "2", "--checkpointing_steps", "1",
                      "--push_to_hub", "--hub_model_id", "lab/moebert-test", "--hub_token", "hf_test")
    assert "model.safetensors" in hub.repos["lab/moebert-test"]["files"]  # step 1's model arrived
    printed = capsys.readouterr().err  # the library's messages, as train.py shows them
    assert "pushed to" not in printed  # training did not finish: no claim that the model was pushed
    assert "uploads queued before training stopped arrived" in printed and "the final model was not pushed" in printed


def test_the_embedded_base_is_recorded_by_its_hub_id_and_still_grows_offline(tmp_path):
    from moebert.names import DEFAULT_BASE_MODEL_ID

    model, tokenizer = build_model(default_base_model(), ["CVD"], RECIPES["quick"]["moe_layers"])
    assert model.config.base_model_name_or_path == DEFAULT_BASE_MODEL_ID  # not a site-packages folder
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert str(default_base_model()) not in (tmp_path / "config.json").read_text()
    # continuing it with a new domain (HF_HUB_OFFLINE=1): the new expert starts from the embedded base's blocks
    grown, _ = build_model(str(tmp_path), ["CVD", "ONC"], RECIPES["quick"]["moe_layers"])
    cvd, onc = (grown.expert_state(grown.config.expert_of_domain(i)) for i in (0, 1))
    for key, tensor in cvd.items():
        torch.testing.assert_close(onc[key.replace(".experts.0.", ".experts.1.")], tensor, atol=0, rtol=0)


def test_the_model_card_carries_hub_metadata_usage_and_valid_results(tiny_bert, tiny_data, tmp_path):
    import json

    from huggingface_hub import ModelCard

    run_train(tiny_bert, tiny_data, tmp_path / "out", "--max_train_steps", "2")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    state = json.loads((tmp_path / "out" / "training_state.json").read_text())
    assert card.data.base_model is None  # a local folder: neither its path nor its name, which passes for a Hub id
    assert "the feed-forward blocks of a local BERT" in card.text
    assert card.data.library_name == "sentence-transformers"
    assert card.data.pipeline_tag == "sentence-similarity" and "moebert" in card.data.tags
    results = {(r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert len(results) == 4  # roc_auc and f1_max for both domains
    for domain in ("CVD", "COPD"):
        assert results[(domain, "roc_auc")] == round(state["metrics"][domain]["roc_auc"], 4)
    assert 'prompt_name="CVD"' in card.text and "model.prepend_domain_token" in card.text and "Hallee" in card.text
    assert "model.cocitation_probability(cosine" in card.text  # train.py calibrates every model it saves
    assert "of a local BERT (layers 2, 3 of 4) copied into one" in card.text


def test_the_card_names_the_licence_of_the_embedded_base():
    from moebert.names import DEFAULT_BASE_MODEL_ID

    assert model_card.base_licence(DEFAULT_BASE_MODEL_ID) == "apache-2.0"
    assert model_card.base_licence("no/such-model-offline") is None


def test_gradient_checkpointing_recomputes_and_keeps_the_gradients(tiny_bert, tiny_data, tmp_path, monkeypatch):
    from modeling_moebert import MoEBertModel

    class SetUp(Exception):
        pass

    def stop(model, *args):
        raise SetUp

    grads, expert_calls = [], []
    for flags in ([], ["--gradient_checkpointing"]):
        model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=["CVD", "COPD"])
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        monkeypatch.setattr(train, "build_model", lambda *args: (model, tokenizer))
        monkeypatch.setattr(training_setup, "make_optimizer", stop)
        with pytest.raises(SetUp):  # stop train() right after it has set the model up
            run_train(tiny_bert, tiny_data, tmp_path / "out", *flags)
        calls = [0]
        model.encoder.layer[0].experts[0].register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        batch = tokenizer([f"[CVD] {t}" for t in TEXTS[:2]], padding=True, return_tensors="pt")
        model.train()(**batch).pooler_output.pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        expert_calls.append(calls[0])
    assert expert_calls == [1, 2]  # recomputed in the backward pass
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_ddp_looks_for_unused_parameters_only_when_an_expert_can_miss_a_step(tiny_bert):
    from modeling_moebert import MoEBertModel

    moe, _ = MoEBertModel.from_bert(tiny_bert, domains=["CVD", "COPD"])
    shared, _ = MoEBertModel.from_bert(tiny_bert, domains=["CVD", "COPD"], num_experts=1)
    assert training_setup.experts_can_miss_a_step(moe) and not training_setup.experts_can_miss_a_step(shared)
    for parameter in moe.parameters():  # nothing of the experts trained: none can miss a step
        parameter.requires_grad = False
    assert not training_setup.experts_can_miss_a_step(moe)


def test_the_process_group_waits_as_long_as_ddp_timeout(monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_accelerator(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(train, "Accelerator", fake_accelerator)
    with pytest.raises(Stop):
        train.main(["--ddp_timeout", "5400"])
    timeouts = [h.timeout for h in seen["kwargs_handlers"] if hasattr(h, "timeout")]
    assert [t.total_seconds() for t in timeouts] == [5400]


def test_validation_is_shared_between_processes_and_every_process_gets_every_vector(tiny_moe, monkeypatch):
    from types import SimpleNamespace

    from moebert.encoders import transformer as encoders
    from moebert.encoders.transformer import TransformerEncoder

    model, tokenizer = tiny_moe
    encoder = TransformerEncoder(model, tokenizer, 32, 2)
    texts = TEXTS + [t.upper() for t in TEXTS]  # 10 texts, 2 processes
    seen = []
    encode = encoder.encode
    encoder.encode = lambda share, domain: (seen.append(list(share)), encode(share, domain))[1]
    # what process 1 would contribute, gathered beside this process's (process 0's) share
    monkeypatch.setattr(encoders, "gather_object", lambda own: own + [encode(texts[1::2], "CVD")])
    sharded = ShardedEncoder(encoder, SimpleNamespace(process_index=0, num_processes=2))
    vectors = sharded.encode(texts, "CVD")
    assert seen == [texts[0::2]]  # this process encoded only its share
    np.testing.assert_allclose(vectors, encode(texts, "CVD"), atol=1e-5)
