"""What a replica serves and its switches (query/replica.py), in this process: the service's /reload, its stage
follower and its readiness call these (tests/test_service.py and tests/test_faults.py drive them over HTTP)."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

import pytest

from model_store import stages
from query.errors import ApiError
from query.replica import Replica


def tag_of(embedder: str):
    async def tag() -> str:
        return embedder
    return tag


def test_a_replica_with_nothing_promoted_says_so(stages_dir):
    replica = Replica("production", tag_of("unused"))
    replica.start(None, None)
    assert replica.problem == "nothing is promoted to production"
    with pytest.raises(ApiError) as err:
        replica.require()
    assert (err.value.status, err.value.message) == (HTTPStatus.SERVICE_UNAVAILABLE,
                                                     "not ready: nothing is promoted to production")


def test_a_broken_artifact_leaves_the_replica_up_and_saying_why(stages_dir, demo_index, tmp_path):
    deployment = stages.promote(demo_index.tag, "production")
    replica = Replica("production", tag_of(deployment.embedder))
    replica.start(deployment, tmp_path / "no-such-artifact")
    assert replica.active is None
    assert replica.problem.startswith(f"index {deployment.index} cannot be served: "), replica.problem


def test_readiness_names_the_embedder_an_index_needs(stages_dir, demo_index):
    deployment = stages.promote(demo_index.tag, "production")
    replica = Replica("production", tag_of(deployment.embedder))
    replica.start(deployment, None)
    assert replica.problem is None and replica.built_with(deployment.embedder)
    assert not replica.built_with("embedder:other")
    assert replica.problem == (f"index {deployment.index} needs embedder {deployment.embedder}, the embedder "
                               "service runs embedder:other: redeploy")


def test_switches_follow_promotions_and_never_to_an_index_the_embedder_cannot_serve(stages_dir, demo_index,
                                                                                    second_index):
    async def run() -> None:
        first = stages.promote(demo_index.tag, "production")
        replica = Replica("production", tag_of(first.embedder))
        replica.start(first, None)
        assert (await replica.switch()).changed is False  # the stage still names what it serves
        second = stages.promote(second_index.tag, "production", force=True)
        answer = await replica.switch()
        assert (answer.changed, answer.served.index, answer.previous) == (True, second.index, first.index)
        assert replica.require().served.index == second.index

        stages.rollback("production")
        other = Replica("production", tag_of("embedder:other"))
        other.start(second, None)
        with pytest.raises(ApiError) as err:
            await other.switch()
        assert err.value.status == HTTPStatus.CONFLICT
        assert err.value.message == (f"{first.index} needs embedder {first.embedder}, but the embedder service "
                                     "runs embedder:other: redeploy the service")
        assert other.require().served.index == second.index  # the old one keeps serving

    asyncio.run(run())


def test_a_stage_emptied_is_not_switched_to(stages_dir, demo_index):
    async def run() -> None:
        replica = Replica("staging", tag_of("unused"))
        replica.start(None, None)
        with pytest.raises(ApiError) as err:
            await replica.switch()
        assert (err.value.status, err.value.message) == (HTTPStatus.CONFLICT, "nothing is promoted to staging")

    asyncio.run(run())
