"""Read TensorBoard event files the way TensorBoard does, with tensorboardX's protos only
(the ``tensorboard`` package is not installed here).

Records are TFRecords (length, masked CRC of the length, data, masked CRC of the data), checked
with tensorboardX's CRC. Files are read in name order, and an ``Event`` with a SessionLog START
purges the events at or after its step (``purge_step``), as TensorBoard's EventAccumulator does.
"""

from __future__ import annotations

import struct

from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.record_writer import masked_crc32c


def events_of(data: bytes) -> list[Event]:
    out, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("Q", header)
        assert struct.unpack("I", data[pos + 8 : pos + 12])[0] == masked_crc32c(header), "corrupt length"
        body = data[pos + 12 : pos + 12 + length]
        assert struct.unpack("I", data[pos + 12 + length : pos + 16 + length])[0] == masked_crc32c(body), "corrupt record"
        ev = Event()
        ev.ParseFromString(body)
        out.append(ev)
        pos += 16 + length
    return out


def visible(files: dict[str, bytes]) -> dict[str, list[tuple[int, object]]]:
    """tag -> [(step, value)] as TensorBoard shows them: scalars as floats, images as
    (width, height, PNG bytes); purged events removed."""
    tags: dict[str, list[tuple[int, object]]] = {}
    for name in sorted(files):
        for ev in events_of(files[name]):
            if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                for series in tags.values():
                    series[:] = [(s, v) for s, v in series if s < ev.step]
            if not ev.HasField("summary"):
                continue
            for value in ev.summary.value:
                if value.HasField("image"):
                    item: object = (value.image.width, value.image.height, value.image.encoded_image_string)
                else:
                    item = value.simple_value
                tags.setdefault(value.tag, []).append((ev.step, item))
    return tags


def read_dir(path) -> dict[str, bytes]:
    from pathlib import Path

    return {p.name: p.read_bytes() for p in Path(path).iterdir() if p.name.startswith("events.out.tfevents")}
