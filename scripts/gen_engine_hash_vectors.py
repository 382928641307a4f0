"""Record SGLang's and vLLM's own prefix-cache hashes as test vectors (tests/connectors/data/*.json).

Run it inside the engines venv (scripts/test-engines.sh builds it: sglang and vllm installed --no-deps),
never in CI: it imports THEIR hashing code, not kvfuse's.

    /tmp/engines-venv/bin/python scripts/gen_engine_hash_vectors.py

SGLang: ``sglang.srt.mem_cache.cpp_utils.native_hash.get_native_hash`` (the C++ extension behind
``mem_cache.utils.get_hash_str``; built on first use with torch's cpp_extension, needs g++ and OpenSSL
headers), called with the namespace seed from SGLang's own ``mem_cache.utils.storage_namespace_seed`` (as
its ``get_storage_hash_str`` does; the script stops if that cannot be imported, it never substitutes its own
recipe). vLLM: ``vllm.v1.core.kv_cache_utils.hash_block_tokens`` with
``vllm.utils.hashing.sha256`` / ``xxhash`` after ``init_none_hash``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "tests" / "connectors" / "data"


def _cases() -> list[dict[str, Any]]:
    rng = random.Random(20261121)
    cases: list[dict[str, Any]] = [
        {"name": "empty", "tokens": [], "page": 4},
        {"name": "one_page", "tokens": [1, 2, 3, 4], "page": 4},
        {"name": "partial_tail", "tokens": list(range(10)), "page": 4},
        {"name": "page1", "tokens": [5, 6, 7], "page": 1},
        {"name": "large_ids", "tokens": [0, 49151, 151645, 2**31 - 1, 2**32 - 1, 7, 8, 9], "page": 4},
        {"name": "wide_ids", "tokens": [1, 2**32, 3, 4, 5, 6, 7, 8], "page": 4},
    ]
    for i, page in enumerate((16, 64)):
        tokens = [rng.randrange(0, 152000) for _ in range(3 * page + 5)]
        cases.append({"name": f"random_{page}", "tokens": tokens, "page": page})
        cases.append({"name": f"random_b_{i}", "tokens": [rng.randrange(0, 50000) for _ in range(200)], "page": page})
    return cases


def sglang_vectors() -> dict[str, Any]:
    from array import array

    from sglang.srt.mem_cache.cpp_utils.native_hash import get_native_hash

    try:
        from sglang.srt.mem_cache.utils import storage_namespace_seed
    except Exception as exc:
        # no fallback to a local copy of the recipe: the vectors would then test kvfuse against itself
        raise SystemExit(
            f"cannot import SGLang's storage_namespace_seed (sglang.srt.mem_cache.utils): {exc!r}; "
            "install the light dependencies scripts/test-engines.sh installs and run this again"
        ) from exc

    out = []
    for case in _cases():
        for ns in ((None, None), ("tenant-a", None), (None, "salt"), ("", "")):
            prior = storage_namespace_seed(*ns)
            keys = get_native_hash(array("q", case["tokens"]), bytes.fromhex(prior) if prior else None, case["page"])
            out.append({**case, "extra_key": ns[0], "cache_salt": ns[1], "seed": prior, "hashes": keys})
    # continuing a chain from a given prior hash
    prior = out[-1]["hashes"][0]
    keys = get_native_hash(array("q", [9, 8, 7, 6, 5]), bytes.fromhex(prior), 2)
    out.append({"name": "continued", "tokens": [9, 8, 7, 6, 5], "page": 2, "prior_hash": prior, "hashes": keys})
    return {"sglang_version": importlib.metadata.version("sglang"), "function": "get_native_hash", "vectors": out}


def vllm_vectors() -> dict[str, Any]:
    from vllm.utils import hashing
    from vllm.v1.core import kv_cache_utils as kcu

    out = []
    for algo in ("sha256", "xxhash"):
        fn = hashing.get_hash_fn_by_name(algo)
        for seed in (None, "1234"):
            if seed is None:
                os.environ.pop("PYTHONHASHSEED", None)
                if algo != "sha256":
                    continue  # random per process: nothing to pin
            else:
                os.environ["PYTHONHASHSEED"] = seed
            kcu.init_none_hash(fn)
            for case in _cases():
                for salt in (None, "salt-1"):
                    parent = None
                    hashes = []
                    toks = case["tokens"]
                    for start in range(0, len(toks) - case["page"] + 1, case["page"]):
                        extra = (("cache_salt", salt),) if (start == 0 and salt) else None
                        parent = kcu.hash_block_tokens(fn, parent, toks[start : start + case["page"]], extra)
                        hashes.append(bytes(parent).hex())
                    out.append(
                        {**case, "algo": algo, "pythonhashseed": seed, "cache_salt": salt, "hashes": hashes,
                         "none_hash": bytes(kcu.NONE_HASH).hex()}
                    )
    os.environ.pop("PYTHONHASHSEED", None)
    return {"vllm_version": importlib.metadata.version("vllm"), "function": "hash_block_tokens", "vectors": out}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, fn in (("sglang_page_hashes.json", sglang_vectors), ("vllm_block_hashes.json", vllm_vectors)):
        data = fn()
        (OUT / name).write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {OUT / name}: {len(data['vectors'])} vectors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
