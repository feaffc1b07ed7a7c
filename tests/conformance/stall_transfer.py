"""Child process for the crash scenarios: runs one transfer and stalls it, waiting for SIGKILL.

    python stall_transfer.py CONFIG_JSON upload|download SOURCE DESTINATION STALL_AFTER \\
        [COMPRESSION]

Once the progress callback reports at least STALL_AFTER bytes (or the total, if smaller),
it prints ``STALLED <done> <total>`` and sleeps inside the callback, so the transfer can
neither finish nor commit. The test then kills this process with SIGKILL, the way a node
failure or the OOM killer would, and checks that the next transfer resumes. COMPRESSION, if
given, is the upload's (an encoded upload; CONFIG_JSON may hold an encryption_key).
"""

from __future__ import annotations

import json
import sys
import time

from vmstore import DownloadRequest, StorageConfig, UploadRequest, new_storage


def main() -> int:
    config_json, mode, source, destination, stall_after = sys.argv[1:6]
    compression = sys.argv[6] if len(sys.argv) > 6 else None
    config = StorageConfig(**json.loads(config_json))
    after = int(stall_after)

    def stall(done: int, total: int) -> None:
        if done >= min(after, total):
            print(f"STALLED {done} {total}", flush=True)
            time.sleep(600)

    with new_storage(config) as store:
        if mode == "upload":
            store.upload(
                UploadRequest(source, destination, compression=compression, progress_callback=stall)
            )
        else:
            store.download(DownloadRequest(source, destination, progress_callback=stall))
    print("FINISHED without stalling", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
