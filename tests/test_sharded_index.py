"""Indexing with several processes (`accelerate launch search.py index`): the same index as one process builds,
resumable whatever the process count of the run that stopped."""

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, collection, requires_faiss, python_path

from moebert.search.index import PaperIndex


def index_with(processes: int, papers, model, out, *extra, script="search.py", env=None):
    """search.py index in `processes` CPU processes (gloo), or plainly in one."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--main_process_port", "29541"] if processes > 1 else [sys.executable]
    command = [*launch, str(ROOT / "tests" / script if script != "search.py" else ROOT / script), "index",
               "--papers", str(papers), "--model", model, "--output_dir", str(out), "--max_seq_length", "32",
               "--chunk_size", "5", *extra]
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": python_path()} | (env or {})
    environment = {k: v for k, v in environment.items() if v is not None}  # None: not set
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


def stored(out) -> tuple[list, list, np.ndarray]:
    """ids, domains and vectors of an index, in index order."""
    chunks = sorted((out / "chunks").glob("*.parquet"))
    tables = [pq.read_table(c).to_pandas() for c in chunks]
    vectors = np.concatenate([np.load(c.with_suffix(".npy")) for c in chunks])
    return sum((t["id"].tolist() for t in tables), []), sum((t["domain"].tolist() for t in tables), []), vectors


def same_answers(out, reference, papers):
    """The queries of a few papers' texts give the same hits, with the same cosines (to the last bits a thread count
    can move), on both indexes."""
    answers = [PaperIndex.load(folder).search(papers["text"][::7].tolist(), top_k=5) for folder in (out, reference)]
    for got, expected in zip(*answers):
        assert got["domain"] == expected["domain"] and [h["id"] for h in got["hits"]] == [h["id"] for h in expected["hits"]]
        assert [h["score"] for h in got["hits"]] == pytest.approx([h["score"] for h in expected["hits"]], abs=1e-6)


@pytest.fixture
def papers(tmp_path):
    papers = collection(16)  # 32 papers, 7 chunks of 5
    papers.to_csv(tmp_path / "papers.csv", index=False)
    return papers


@requires_faiss
def test_two_processes_build_the_index_one_process_builds(moe_folder, papers, tmp_path):
    one = index_with(1, tmp_path / "papers.csv", moe_folder, tmp_path / "one")
    two = index_with(2, tmp_path / "papers.csv", moe_folder, tmp_path / "two")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    ids, domains, vectors = stored(tmp_path / "one")
    ids2, domains2, vectors2 = stored(tmp_path / "two")
    assert ids == ids2 == papers["id"].tolist() and domains == domains2  # the collection's own order
    np.testing.assert_allclose(vectors2, vectors, atol=1e-6, rtol=0)
    same_answers(tmp_path / "two", tmp_path / "one", papers)
    assert "process 1 of 2: encoded 3 chunks (0 were done before)" in two.stderr  # 7 chunks dealt out in turn


@requires_faiss
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_build_stopped_part_way_resumes_with_another_number_of_processes(moe_folder, papers, tmp_path, first,
                                                                           then):
    straight = index_with(1, tmp_path / "papers.csv", moe_folder, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "resumed"
    killed = index_with(first, tmp_path / "papers.csv", moe_folder, out, script="interrupted_search.py",
                        env={"INTERRUPT_AFTER_CHUNKS": "2"})
    assert killed.returncode != 0 and not (out / "index.faiss").exists()
    written = sorted(p.stem for p in (out / "chunks").glob("*.parquet"))
    assert len(written) == 2 * first  # each process wrote two chunks before it died
    resumed = index_with(then, tmp_path / "papers.csv", moe_folder, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.stem for p in (out / "chunks").glob("*.parquet"))[:len(written)] == written  # kept, not redone
    ids, domains, vectors = stored(tmp_path / "straight")
    ids2, domains2, vectors2 = stored(out)
    assert ids2 == ids and domains2 == domains
    np.testing.assert_allclose(vectors2, vectors, atol=1e-6, rtol=0)
    same_answers(out, tmp_path / "straight", papers)


def test_processes_that_do_not_share_the_output_folder_are_refused(moe_folder, papers, tmp_path, monkeypatch):
    from accelerate import PartialState

    from moebert.search.index import SearchError, check_shared_folder

    class Elsewhere:  # process 1 of 2, on a machine whose disk does not hold what process 0 wrote
        num_processes, process_index, is_main_process = 2, 1, False

        def wait_for_everyone(self):
            pass

    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda token: token.__setitem__(0, "from-process-0"))
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda own: [(0, "machine-a", True)] + own)
    with pytest.raises(SearchError, match=r"is not one folder for every process \(process 1 on .* does not see what "
                                          r"process 0 wrote there\): .*needs an --output_dir that every process sees"):
        check_shared_folder(tmp_path, Elsewhere())
    assert PartialState().num_processes == 1  # this test's own process: one, so nothing to check
    check_shared_folder(tmp_path, PartialState())


@requires_faiss
def test_processes_launched_without_forming_a_group_are_refused(moe_folder, papers, tmp_path):
    alone = index_with(2, tmp_path / "papers.csv", moe_folder, tmp_path / "out",  # on a machine without GPUs
                       env={"ACCELERATE_USE_CPU": None, "CUDA_VISIBLE_DEVICES": ""})
    assert alone.returncode != 0
    assert "error: 2 processes were launched but Accelerate sees 1" in alone.stderr + alone.stdout
    assert not (tmp_path / "out" / "chunks").exists()  # nothing written by processes that each thought they were alone
