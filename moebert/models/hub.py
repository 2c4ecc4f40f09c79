"""Uploads to one Hub model repo in the background, from snapshots, so that training never waits on the network
and a failed push never touches a local file; and the one check of the `--push_to_hub` flags of every command."""

import concurrent.futures
import logging
import os
import shutil
import time
from pathlib import Path

from huggingface_hub import HfApi, constants

logger = logging.getLogger(__name__)


def push_refusal(push_to_hub: bool, hub_model_id: str | None) -> str | None:
    """Why `--push_to_hub` cannot go as given (for the command's parser to refuse in one line), or None."""
    if push_to_hub and not hub_model_id:
        return "--push_to_hub needs --hub_model_id ORG/NAME"
    if push_to_hub and constants.HF_HUB_OFFLINE:
        return "--push_to_hub needs the network, but HF_HUB_OFFLINE is set: unset it or drop --push_to_hub"
    return None


class HubPusher:
    """Uploads to one Hub model repo in the background (huggingface_hub's `run_as_future`: one upload at a time,
    in order), so training never waits on the network (and the other processes never wait on the main one).

    Each push uploads a snapshot: hard links to the files as they are when `push` is called, so the loop may go
    on rewriting and rotating checkpoints during the upload. A push to a repo folder whose previous push has not
    started yet replaces it: only the newest is sent. A push that still fails after `attempts` tries is reported
    as a warning; the local files are never touched.
    """

    def __init__(
        self, repo_id: str, staging_dir: Path, token=None, private=False, attempts: int = 3, backoff_s: float = 2.0
    ):
        self.api = HfApi(token=token)
        self.staging_dir = staging_dir
        shutil.rmtree(staging_dir, ignore_errors=True)  # snapshots that a killed run left behind
        self.repo_id, self.private, self.attempts, self.backoff_s = repo_id, private, attempts, backoff_s
        self.repo_ready, self.failed, self.snapshots = False, [], 0
        self.uploads = {}  # repo folder -> (future, snapshot) of its newest push

    def push(self, folder: Path, path_in_repo: str, message: str, files: list[str] | None = None):
        """Upload `files` (paths relative to `folder`; default: all of it) into `path_in_repo` of the repo, in the
        background."""
        files = files or [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file()]
        self.snapshots += 1
        snapshot = self.staging_dir / str(self.snapshots)
        try:
            for name in files:
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(folder / name, snapshot / name)
        except OSError as error:  # e.g. a full disk: skip this push, keep training
            shutil.rmtree(snapshot, ignore_errors=True)
            self.failed.append(message)
            logger.warning(f"warning: not pushing '{message}': cannot stage {folder} for upload ({error})")
            return
        previous = self.uploads.get(path_in_repo)
        if previous and previous[0].cancel():  # still waiting: this newer snapshot supersedes it
            shutil.rmtree(previous[1], ignore_errors=True)
        self.uploads[path_in_repo] = (self.api.run_as_future(self._upload, snapshot, path_in_repo, message, folder), snapshot)

    def close(self, timeout: float | None = None) -> tuple[list[str], int]:
        """Wait for the uploads (at most `timeout` seconds in all); returns the failures (already reported) and the
        number of pushes still under way."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = 0
        for future, _ in self.uploads.values():  # the newest per folder; those before it ran first (one worker)
            try:
                future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                pending += 1
        return self.failed, pending

    def finish(self, completed: bool = True, timeout: float | None = None) -> int:
        """Wait for the queued uploads and say how it went: "pushed" only when training completed and every push
        arrived. Returns the number of uploads abandoned after `timeout` seconds."""
        logger.info(f"waiting for the uploads to the Hub repo {self.repo_id} ...")
        failed, pending = self.close(timeout)
        if failed:
            logger.warning(f"{len(failed)} pushes to {self.repo_id} did not arrive (warnings above): "
                           f"{', '.join(repr(m) for m in failed)}")
        if pending:
            logger.warning(f"{pending} uploads to {self.repo_id} were still under way after {timeout:g} s and are "
                           "abandoned; the local files are intact")
        if failed or pending:
            return pending
        if completed:
            logger.info(f"pushed to {self.api.endpoint}/{self.repo_id}")
        else:
            logger.info(f"the uploads queued before training stopped arrived at {self.api.endpoint}/{self.repo_id}; the "
                        "final model was not pushed")
        return 0

    def _upload(self, snapshot: Path, path_in_repo: str, message: str, local: Path):
        try:
            self._upload_with_retries(snapshot, path_in_repo, message, local)
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def _upload_with_retries(self, snapshot: Path, path_in_repo: str, message: str, local: Path):
        for attempt in range(1, self.attempts + 1):
            try:
                if not self.repo_ready:
                    self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
                    self.repo_ready = True
                self.api.upload_folder(
                    repo_id=self.repo_id, folder_path=snapshot, path_in_repo=path_in_repo or None, commit_message=message
                )
                return
            except Exception as error:  # network, HTTP status, auth: all end in the same warning
                if attempt < self.attempts:
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
                    continue
                where = f"{self.repo_id}/{path_in_repo}" if path_in_repo else self.repo_id
                self.failed.append(message)
                logger.warning(
                    f"warning: pushing '{message}' to the Hub repo {where} failed {attempt} times "
                    f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). The local copy in "
                    f"{local} is intact; upload it later with: hf upload {self.repo_id} {local} {path_in_repo or '.'}"
                )


def link_or_copy(source: Path, target: Path):
    try:
        os.link(source, target)  # the snapshot keeps the file's content even if the loop replaces or deletes it
    except OSError:
        shutil.copy2(source, target)
