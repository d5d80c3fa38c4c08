"""The embedded broker: kombu's filesystem transport, made safe between processes.

kombu's ``filesystem://`` transport writes a message into its final file name
and fills it afterwards, so a consumer in another process can pick up a file
that is still empty or half written and lose the message. This subclass
writes to a hidden temporary name and renames it into place (atomic on POSIX),
and creates its folders itself. It keeps the transport's limits: no
acknowledgements (a message taken by a worker that dies is gone), no priority,
polling only. It is for development; production settings refuse it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads


def broker_folders(root: Path) -> dict[str, str | bool]:
    """Transport options that keep every folder of the broker under ``root``."""
    queue = root / "queue"
    return {
        "data_folder_in": str(queue),
        "data_folder_out": str(queue),
        "processed_folder": str(root / "processed"),
        "control_folder": str(root / "control"),
        "store_processed": False,
    }


class Channel(filesystem.Channel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for option in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
            folder = self.transport_options.get(option)
            if folder:
                Path(folder).mkdir(parents=True, exist_ok=True)

    # kombu names this parameter "message" in its base class and "payload" here.
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # A leading dot keeps the file out of the consumer's pattern until renamed.
        temporary = os.path.join(self.data_folder_out, f".{name}.tmp")
        with open(temporary, "wb") as file:
            file.write(str_to_bytes(dumps(payload)))
        os.replace(temporary, final)

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        # The base class moves a taken file to the system temp folder, which may be
        # another file system (copy then delete: two consumers could both get it).
        # A rename within our folder is atomic: exactly one consumer wins it.
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.startswith(".") or name.partition(".")[2] != wanted:
                continue
            taken = os.path.join(self.processed_folder, name)
            try:
                os.rename(os.path.join(self.data_folder_in, name), taken)
            except OSError:
                continue  # another consumer took it first
            try:
                with open(taken, "rb") as file:
                    payload = file.read()
            finally:
                os.remove(taken)
            return loads(bytes_to_str(payload))
        raise Empty()

    @property
    def processed_folder(self) -> str:
        return str(self.transport_options.get("processed_folder", "processed"))


class Transport(filesystem.Transport):
    Channel = Channel
