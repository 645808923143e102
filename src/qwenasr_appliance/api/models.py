"""`GET /v1/models` and `GET /v1/models/{id}`: the one model this server serves."""

from __future__ import annotations

import time
from typing import Any

from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.params import FromPath

from qwenasr_appliance.api.auth import require_api_key
from qwenasr_appliance.api.context import AppContext, request_context
from qwenasr_appliance.api.errors import error_responses, model_not_found
from qwenasr_appliance.api.schemas import ModelCard, ModelList
from qwenasr_appliance.languages import SUPPORTED_LANGUAGES

_CREATED = int(time.time())


def _card(context: AppContext) -> ModelCard:
    settings = context.settings
    return ModelCard(
        id=settings.model_name,
        created=_CREATED,
        owned_by="qwenasr-appliance",
        root=settings.model_id,
        max_audio_seconds=settings.max_audio_seconds,
        languages=list(SUPPORTED_LANGUAGES),
    )


class ModelsController(Controller):
    path = "/v1/models"
    guards = [require_api_key]
    tags = ["models"]

    @get("/", summary="List models", responses=error_responses(401))
    async def list_models(self, request: Request[Any, Any, State]) -> ModelList:
        return ModelList(data=[_card(request_context(request))])

    @get("/{model_id:path}", summary="Retrieve a model", responses=error_responses(401, 404))
    async def get_model(self, request: Request[Any, Any, State], model_id: FromPath[str]) -> ModelCard:
        context = request_context(request)
        wanted = model_id.lstrip("/")
        if wanted not in {context.settings.model_name, context.settings.model_id}:
            raise model_not_found(wanted)
        return _card(context)
