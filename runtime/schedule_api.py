"""The handlers of `/v1/vals/{user}/{val}/schedule` (docs/schedules.md). Owner only.

    GET     the schedule with next_run_at and last_run_at (Unix times); 404 if none
    PUT     {"cron": "*/5 * * * *", "tz": "Europe/Paris"} or {"every_s": 300}; 201 new, 200
    DELETE  remove it; a tick that is due and not yet claimed never fires

Who may: as for the val's records. Writing another user's schedule is 403 (no token 401);
reading it is 403 where the val's code is readable and 404 for a private val.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from runtime.auth import authenticate, check_names, may_read, owner_only
from runtime.errors import ForbiddenError, NotFoundError
from runtime.http import HTTPRequest, HTTPResponse
from runtime.schedule import parse_schedule
from runtime.store import ScheduleInfo, Store, ValVersion

if TYPE_CHECKING:  # api delegates to this module
    from runtime.api import Api


def schedule_json(val: ValVersion, info: ScheduleInfo) -> dict[str, object]:
    return {"user": val.owner, "val": val.name, **info.to_json()}


async def _owned_val(api: Api, request: HTTPRequest, params: dict[str, str]) -> ValVersion:
    owner, name = params["user"], params["val"]
    check_names(owner, name)
    await owner_only(api.store, request, owner)
    val = await api.store.call(Store.get_val, owner, name, None)
    if val is None:
        raise NotFoundError(f"no val {owner}/{name}")
    return val


async def get_schedule(api: Api, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
    owner, name = params["user"], params["val"]
    check_names(owner, name)
    caller = await authenticate(api.store, request)
    val = await api.store.call(Store.get_val, owner, name, None)
    if val is None or not may_read(val, caller):
        raise NotFoundError(f"no val {owner}/{name}")
    if caller.name != owner:
        raise ForbiddenError(f"only {owner} may read the schedule of {owner}/{name}")
    info = await api.store.call(Store.schedule_of, val.val_id)
    if info is None:
        raise NotFoundError(f"{owner}/{name} has no schedule")
    return HTTPResponse.json(schedule_json(val, info))


async def put_schedule(api: Api, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
    val = await _owned_val(api, request, params)
    limits = api.config.schedule
    schedule = parse_schedule(request.json(), limits.min_interval_s)
    saved = await api.store.call(
        Store.put_schedule, val.val_id, schedule, time.time(), limits.max_per_user
    )
    if saved is None:  # deleted meanwhile
        raise NotFoundError(f"no val {val.owner}/{val.name}")
    info, created = saved
    return HTTPResponse.json(schedule_json(val, info), 201 if created else 200)


async def delete_schedule(api: Api, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
    val = await _owned_val(api, request, params)
    if not await api.store.call(Store.delete_schedule, val.val_id):
        raise NotFoundError(f"{val.owner}/{val.name} has no schedule")
    return HTTPResponse.json({"deleted": f"{val.owner}/{val.name} schedule"})
