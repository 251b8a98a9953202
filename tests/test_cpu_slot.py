"""The CPU slot: one call computes at a time per process, and none keeps it."""

from __future__ import annotations

import threading
import time

import requests
from conftest import slow_conditions_request, spine_request

from cds_service import cpu

SIGN = "/cds-services/pain-management-order-sign"


def _slot_is_free() -> bool:
    free = cpu.slot._lock.acquire(blocking=False)
    if free:
        cpu.slot._lock.release()
    return free


def test_every_kind_of_answer_gives_the_slot_back(client, fhir_stub):
    answered = client.post(SIGN, json=spine_request(fhir_stub.url)).status_code
    broken = client.post(
        SIGN, data=b"{not json", headers={"Content-Type": "application/json"}
    ).status_code
    wrong_hook = client.post(
        SIGN, json={**spine_request(fhir_stub.url), "hook": "patient-view"}
    ).status_code
    discovery = client.get("/cds-services").status_code

    assert (answered, broken, wrong_hook, discovery) == (200, 400, 400, 200)
    assert not cpu.slot.held and _slot_is_free()


def test_a_call_waiting_on_the_ehr_lets_other_calls_compute(live_server, fhir_stub):
    # Conditions are not prefetched and the EHR answers them after 0.8 s (within
    # the test server's 1 s timeout); a call with complete prefetch, sent
    # meanwhile, must not wait for the slow one.
    slow_body = slow_conditions_request(fhir_stub, delay=0.8)
    finished: dict[str, float] = {}
    started = time.monotonic()

    def call(name: str, body: dict) -> None:
        response = requests.post(live_server.url + SIGN, json=body, timeout=10)
        assert response.status_code == 200
        finished[name] = time.monotonic() - started

    slow = threading.Thread(target=call, args=("slow", slow_body))
    slow.start()
    while not fhir_stub.calls_to("Condition"):
        time.sleep(0.01)
    call("fast", spine_request(fhir_stub.url))
    slow.join(timeout=10)

    assert finished["fast"] < 0.8 <= finished["slow"]


def test_a_thread_holds_the_slot_once_and_waits_for_another_holder():
    slot = cpu.CpuSlot()
    slot.acquire()
    slot.acquire()  # the same thread again: no deadlock, still one hold
    got = threading.Event()

    def other() -> None:
        slot.acquire()
        got.set()
        slot.release()

    thread = threading.Thread(target=other)
    thread.start()
    waited = not got.wait(0.2)
    slot.release()
    thread.join(timeout=5)

    assert waited and got.is_set()
    with slot.released():  # not held: a no-op
        assert not slot.held
