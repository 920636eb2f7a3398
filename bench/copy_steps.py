#!/usr/bin/env python3
"""Where a copy's time goes inside the guest: the agent's own data path for FILE_GET and
FILE_PUT, each step timed on its own, on a raw virtio-serial port (no host protocol, no flow
control).  Runs IN the guest, next to the agent's modules:
`python3 copy_steps.py get|put PORT FILE BYTES [agent_dir]`; prints `step<TAB>ms per MiB` lines
and the loop's MB/s.  bench/backdoor.py --copy-steps copies it in, feeds or drains the port.
stdlib only.
"""

from __future__ import annotations

import os
import sys
import time
import zlib

sys.path.insert(0, sys.argv[5] if len(sys.argv) > 5 else "/usr/lib/ntng-backdoor")
import protocol as P  # noqa: E402

import ntng_agent as A  # noqa: E402


def main() -> None:
    mode, port, path, want = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    A.keep_freed_memory()  # as the agent's main()
    fd = os.open(port, os.O_RDWR)
    conn = A.Connection(fd, fd)
    spent: dict[str, float] = {}
    clock = time.perf_counter

    def timed(step: str, t0: float) -> None:
        spent[step] = spent.get(step, 0.0) + clock() - t0

    moved = 0
    if mode == "get":  # GetTask._run's loop, frame by frame
        src = os.open(path, os.O_RDONLY)
        buf = memoryview(bytearray(P.DEFAULT_MAX_FRAME))
        check = P.Crc32()
        start = clock()
        while True:
            t = clock()
            got = os.readv(src, [buf])
            timed("read the file (readv)", t)
            if not got:
                break
            part = buf[:got]
            t = clock()
            crc = zlib.crc32(part)
            timed("CRC-32 of the payload (one pass)", t)
            t = clock()
            check.update(part, crc)
            timed("whole-file CRC (combined)", t)
            t = clock()
            head, trailer = P.frame_parts(P.FrameType.FILE_DATA, 1, part, crc)
            timed("frame header and trailer", t)
            t = clock()
            conn.writev([head, part, trailer])
            timed("write the frame to the port (writev)", t)
            moved += got
    else:  # the reader loop, decoder and PutTask.on_data
        # As PutTask with FLAG_DIRECT (a TCG guest): O_DIRECT through the staging buffer
        out, direct = A._open_for_put(path, direct=want >= A.DIRECT_FROM)
        writer = A.DirectWriter(out) if direct else None
        decoder = P.Decoder(P.DEFAULT_MAX_FRAME)
        check = P.Crc32()
        start = 0.0
        while moved < want:
            t = clock()
            data = conn.read(A.READ_BUFFER)
            if not start:
                start = clock()  # from the first bytes: not the wait for the host to begin
            else:
                timed("read the port (batched readv)", t)
            t = clock()
            decoder.feed(data)
            timed("decoder: feed (a copy)", t)
            t = clock()
            frames = [ev for ev in decoder.events() if isinstance(ev, P.Frame)]
            timed("decoder: frames (CRC, payload copy)", t)
            for frame in frames:
                t = clock()
                if writer is not None:
                    writer.write(frame.payload)
                else:
                    A._write_all(out, frame.payload)
                timed("write the file (O_DIRECT, staged)" if writer is not None else "write the file", t)
                t = clock()
                check.update(frame.payload, frame.payload_crc)
                timed("whole-file CRC (combined)", t)
                moved += len(frame.payload)
        if writer is not None:
            t = clock()
            writer.finish()
            timed("write the file (O_DIRECT, staged)", t)
        os.close(out)
    total = clock() - start
    mib = moved / (1 << 20)
    for step, seconds in spent.items():
        print(f"{mode}: {step}\t{seconds * 1000 / mib:.3f}")
    print(f"{mode}: the loop, MB/s\t{moved / total / 1e6:.1f}")


if __name__ == "__main__":
    main()
