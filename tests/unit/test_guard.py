"""ensemble.guard: each rule refuses what it must (with its own message) and lets real requests through."""

import json

import numpy as np
import pytest

from ensemble.guard import GuardLimits, Refused, check_infer

LIMITS = GuardLimits(max_body_bytes=1 << 20, max_elements=1000)


def _json(*inputs) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


def _tensor(shape, data=None, name="user_id", **extra):
    out = {"name": name, "shape": shape, "datatype": "INT64", **extra}
    if data is not None:
        out["data"] = data
    return out


@pytest.mark.parametrize("body, message", [
    (_json(_tensor([2**40, 1], [1])), r"shape \[1099511627776, 1\] has a dimension outside 0\.\.2147483647"),
    (_json(_tensor([2**61 + 1, 1], list(range(10)))), r"has a dimension outside 0\.\.2147483647"),
    (_json(_tensor([-1, 1], [1])), r"shape \[-1, 1\] has a dimension outside"),
    (_json(_tensor([2000, 1], [1])), r"shape \[2000, 1\] holds 2000 values, over the maximum of 1000"),
    (_json(_tensor([2, 1], [1])), r"input 'user_id': data holds 1 values, shape \[2, 1\] needs 2"),
    (_json(_tensor([1.5, 1], [1])), r"shape must be a list of at most 8 integers, got \[1\.5, 1\]"),
    (_json(_tensor([True, 1], [1])), r"shape must be a list of at most 8 integers, got \[True, 1\]"),
    (_json(_tensor([1, 1])), r"input 'user_id' has neither 'data' nor a binary_data_size"),
    (b'{"inputs":[{"name":"user_id","shape":[1,1],"datatype":"INT64","data":' + b"[" * 40_000 + b"1" + b"]" * 40_000 + b"}]}",
     "request JSON is nested too deeply"),
    (_json(_tensor([1, 1], [[[[[[[[[[[1]]]]]]]]]]])), "nested deeper than any tensor shape"),
    (b"{not json", "request body is not valid JSON"),
    (b'{"outputs": []}', "must be an object with an 'inputs' list"),
])
def test_each_refusal_has_its_own_message(body, message):
    with pytest.raises(Refused, match=message):
        check_infer(body, None, LIMITS)


def test_binary_requests_must_add_up():
    header = _json(_tensor([2, 1], parameters={"binary_data_size": 16}))
    payload = np.array([[1], [2]], np.int64).tobytes()
    check_infer(header + payload, len(header), LIMITS)  # a real binary request passes
    with pytest.raises(Refused, match=r"binary inputs declare 16 bytes, the body carries 8"):
        check_infer(header + payload[:8], len(header), LIMITS)
    with pytest.raises(Refused, match=r"Inference-Header-Content-Length 100000 is not within the body of \d+ bytes"):
        check_infer(header + payload, 100_000, LIMITS)
    wrapped = _json(_tensor([1, 2**61 + 1], name="exclude_item_ids", parameters={"binary_data_size": 8}))
    with pytest.raises(Refused, match=r"input 'exclude_item_ids': shape \[1, 2305843009213693953\] has a dimension outside"):
        check_infer(wrapped + payload[:8], len(wrapped), LIMITS)
    lying = _json(_tensor([2, 1], parameters={"binary_data_size": 8}))
    with pytest.raises(Refused, match=r"binary_data_size 8 does not match shape \[2, 1\] of INT64"):
        check_infer(lying + payload[:8], len(lying), LIMITS)


def test_real_requests_pass():
    check_infer(_json(_tensor([3, 1], [1, 2, 3]), _tensor([3, 2], [[1, 2], [3, 4], [5, -1]], name="exclude_item_ids")), None, LIMITS)
    check_infer(_json(_tensor([0, 1], [])), None, LIMITS)  # Triton judges an empty batch itself
