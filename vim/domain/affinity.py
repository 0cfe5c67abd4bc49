"""Affinity groups: servers to be placed together (AFFINITY) or apart (ANTI_AFFINITY).

A group belongs to one tenant; its scope says whether "together" means the same
host or the same zone. Stream: `affinity-<group id>`.

Membership lives in the group's stream: a server joins in the same append that
creates it (`join`, at the group's version) and leaves in the same append that
terminates it (`leave`). So a deletion (`delete`, refused while there are
members) and a concurrent allocation into the group both expect the same
version: one wins and the other decides again, and a group is never deleted
with a member in it. The scheduler (a later issue) reads the members' hosts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

from vim.domain.base import DomainEvent
from vim.errors import DomainError, InvalidTransition, NotFound

KIND = "affinity"


def stream(group_id: str) -> str:
    return f"{KIND}-{group_id}"


class Policy(enum.StrEnum):
    AFFINITY = "AFFINITY"
    ANTI_AFFINITY = "ANTI_AFFINITY"


class Scope(enum.StrEnum):
    HOST = "HOST"
    ZONE = "ZONE"


class GroupNotEmpty(DomainError):
    """A group with members cannot be deleted."""


@dataclass(frozen=True, slots=True)
class AffinityGroupCreated(DomainEvent):
    group_id: str
    tenant_id: str
    name: str
    policy: str
    scope: str
    created_at: str = ""


@dataclass(frozen=True, slots=True)
class AffinityMemberAdded(DomainEvent):
    group_id: str
    server_id: str


@dataclass(frozen=True, slots=True)
class AffinityMemberRemoved(DomainEvent):
    group_id: str
    server_id: str


@dataclass(frozen=True, slots=True)
class AffinityGroupDeleted(DomainEvent):
    group_id: str
    deleted_at: str = ""


@dataclass(frozen=True, slots=True)
class AffinityGroup:
    group_id: str
    tenant_id: str
    name: str
    policy: Policy
    scope: Scope
    created_at: str
    members: tuple[str, ...] = ()
    deleted: bool = False

    def view(self) -> dict[str, Any]:
        """The proto3 JSON view (the API's `AffinityGroup` message)."""
        return {
            "groupId": self.group_id,
            "name": self.name,
            "tenantId": self.tenant_id,
            "policy": f"AFFINITY_POLICY_{self.policy.value}",
            "scope": f"AFFINITY_SCOPE_{self.scope.value}",
            "memberIds": list(self.members),
            "createdAt": self.created_at,
        }


def evolve(
    state: AffinityGroup | None, event: DomainEvent, _recorded: object = None
) -> AffinityGroup:
    match event:
        case AffinityGroupCreated():
            return AffinityGroup(
                event.group_id,
                event.tenant_id,
                event.name,
                Policy(event.policy),
                Scope(event.scope),
                event.created_at,
            )
        case AffinityMemberAdded() if state is not None:
            if event.server_id in state.members:
                return state
            return replace(state, members=(*state.members, event.server_id))
        case AffinityMemberRemoved() if state is not None:
            return replace(state, members=tuple(m for m in state.members if m != event.server_id))
        case AffinityGroupDeleted() if state is not None:
            return replace(state, deleted=True)
    if state is None:
        raise InvalidTransition(f"{type(event).__name__} before AffinityGroupCreated")
    return state


def create(
    group_id: str, tenant_id: str, name: str, policy: Policy, scope: Scope, now: str
) -> AffinityGroupCreated:
    """A new group."""
    return AffinityGroupCreated(group_id, tenant_id, name, policy.value, scope.value, now)


def _live(state: AffinityGroup | None, group_id: str, tenant_id: str | None) -> AffinityGroup:
    """The live group, or NotFound (also for another tenant's when `tenant_id` is given)."""
    if state is None or state.deleted or (tenant_id is not None and state.tenant_id != tenant_id):
        raise NotFound(f"affinity group {group_id} not found")
    return state


def join(state: AffinityGroup | None, group_id: str, tenant_id: str, server_id: str) -> DomainEvent:
    """A server of `tenant_id` joins the group (only a group of the same tenant)."""
    _live(state, group_id, tenant_id)
    return AffinityMemberAdded(group_id, server_id)


def leave(state: AffinityGroup | None, group_id: str, server_id: str) -> list[DomainEvent]:
    """A server leaves the group; nothing if it is not a member."""
    if state is None or server_id not in state.members:
        return []
    return [AffinityMemberRemoved(group_id, server_id)]


def delete(
    state: AffinityGroup | None, group_id: str, tenant_id: str | None, now: str
) -> AffinityGroupDeleted:
    """Delete an empty group; `tenant_id` None means any tenant's (an admin)."""
    group = _live(state, group_id, tenant_id)
    if group.members:
        raise GroupNotEmpty(
            f"affinity group {group_id} has {len(group.members)} member(s): "
            f"{', '.join(group.members[:5])}; terminate or move them first"
        )
    return AffinityGroupDeleted(group_id, now)
