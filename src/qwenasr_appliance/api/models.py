"""`GET /v1/models` and `GET /v1/models/{id}`: the one model this server serves, listed under its first
served name; every accepted name (the other served names, MODEL_ID) retrieves the same card, with that
name as its `id` (a client that checks `retrieve(name).id == name`, as OpenAI's API answers, passes)."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote

from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.params import FromPath

from qwenasr_appliance.api.auth import require_api_key
from qwenasr_appliance.api.context import AppContext, request_context
from qwenasr_appliance.api.errors import error_responses, model_not_found
from qwenasr_appliance.api.schemas import ModelCard, ModelList
from qwenasr_appliance.languages import SUPPORTED_LANGUAGES

_CREATED = int(time.time())
_PREFIX = "/v1/models/"


def _card(context: AppContext, model_id: str | None = None) -> ModelCard:
    """The model's card, under `model_id` (a name the server accepts) or else its first served name."""
    settings = context.settings
    return ModelCard(
        id=model_id or settings.model_name,
        created=_CREATED,
        owned_by="qwenasr-appliance",
        root=settings.model_id,
        max_audio_seconds=settings.max_audio_seconds,
        languages=list(SUPPORTED_LANGUAGES),
    )


def _requested_id(request: Request[Any, Any, State]) -> str | None:
    """The model id as the client sent it, from the undecoded path: the router merges repeated slashes
    and drops the one an id starts with (a local MODEL_ID such as `/models/qwen3`, sent as `%2Fmodels...`).
    None when the server gives no raw path."""
    raw = request.scope.get("raw_path")
    if not raw:
        return None
    _, found, encoded = raw.decode("latin-1").partition(_PREFIX)
    return unquote(encoded) if found else None


class ModelsController(Controller):
    path = _PREFIX.rstrip("/")
    guards = [require_api_key]
    tags = ["models"]

    @get("/", summary="List models", responses=error_responses(401))
    async def list_models(self, request: Request[Any, Any, State]) -> ModelList:
        return ModelList(data=[_card(request_context(request))])

    @get("/{model_id:path}", summary="Retrieve a model", responses=error_responses(401, 404))
    async def get_model(self, request: Request[Any, Any, State], model_id: FromPath[str]) -> ModelCard:
        context = request_context(request)
        wanted = _requested_id(request) or model_id.removeprefix("/")
        if wanted not in context.settings.accepted_model_names:
            raise model_not_found(wanted, context.settings.accepted_model_names)
        return _card(context, wanted)  # as OpenAI's API answers: the card of the model asked for, by its name
