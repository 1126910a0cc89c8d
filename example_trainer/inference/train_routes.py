"""The in-server training routes (with --enable-training; see training.py and sft_worker.py).

  POST /train {training_data: {samples: [{input, expected_output, rationale?}],
               config: {learning_rate, max_steps, batch_size}}}  -> 202 {job_id, status, message}
  GET  /status/{job_id}      {job_id, status: queued|running|completed|failed, training_samples,
                              loss_history, checkpoint_path, error?, ...}
  GET  /train/status         the worker (state, pid, restarts, optimizer steps), queue, job
  POST /checkpoint           write one now (between jobs)
  GET  /checkpoints          {checkpoints: [{filename, path, created_at, size, current}]}
  POST /checkpoint/restore {filename}: that checkpoint's weights and optimizer state go back
                             into the served model (rollback)

`rationale` is kept with the job's record only: the loss covers the expected_output tokens.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from example_trainer.inference import door
from example_trainer.inference.requests import STRICT
from example_trainer.inference.state import state_of
from example_trainer.inference.training import Busy, TrainingService, TrainingUnavailable
from example_trainer.sft_worker import CHECKPOINT_RE, checkpoints, current_checkpoint

MAX_SAMPLES = 4096
MAX_TEXT_CHARS = 64 << 10
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class Sample(BaseModel):
    model_config = STRICT
    input: Text
    expected_output: Text
    rationale: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None


class JobConfig(BaseModel):
    model_config = STRICT
    learning_rate: float = Field(1e-5, gt=0.0, le=1.0, allow_inf_nan=False)
    max_steps: int = Field(10, ge=1, le=100_000)
    batch_size: int = Field(8, ge=1, le=1024)


class TrainingData(BaseModel):
    model_config = STRICT
    samples: list[Sample] = Field(min_length=1, max_length=MAX_SAMPLES)
    config: JobConfig = Field(default_factory=JobConfig)


class TrainRequest(BaseModel):
    model_config = STRICT
    training_data: TrainingData


class RestoreRequest(BaseModel):
    model_config = STRICT
    filename: Annotated[str, Field(pattern=CHECKPOINT_RE.pattern + "$", max_length=64)]


def _service(request: Request) -> TrainingService:
    service = state_of(request).training
    if service is None:
        raise HTTPException(404, "in-server training is off: start the server with "
                                 "--enable-training")
    return service


def _refused(e: Exception) -> HTTPException:
    if isinstance(e, Busy):
        return HTTPException(e.status, str(e))
    return HTTPException(503, str(e))


async def train(request: Request) -> JSONResponse:
    service = _service(request)
    req = door.parse(TrainRequest, await request.body(), "/train")
    try:
        out = service.submit([s.model_dump(exclude_none=True) for s in req.training_data.samples],
                             req.training_data.config.model_dump())
    except (Busy, TrainingUnavailable) as e:
        raise _refused(e) from None
    return JSONResponse(out, status_code=202)


async def job_status(request: Request, job_id: str) -> JSONResponse:
    job = _service(request).status(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id[:64]!r} (jobs are kept in memory: a restarted "
                                 "server forgets them)")
    return JSONResponse(job)


async def train_status(request: Request) -> JSONResponse:
    return JSONResponse(_service(request).overview())


async def checkpoint(request: Request) -> JSONResponse:
    service = _service(request)
    door.require_no_body(await request.body(), "/checkpoint")
    return JSONResponse(await _ask(service, "checkpoint"))


async def list_checkpoints(request: Request) -> JSONResponse:
    folder = Path(_service(request).settings.training_dir)
    current = current_checkpoint(folder)
    out = []
    for ckpt in checkpoints(folder):
        files = [f for f in ckpt.rglob("*") if f.is_file()]
        out.append({"filename": ckpt.name, "path": str(ckpt),
                    "created_at": ckpt.stat().st_mtime, "current": ckpt == current,
                    "size": sum(f.stat().st_size for f in files)})
    return JSONResponse({"checkpoints": out})


async def restore(request: Request) -> JSONResponse:
    service = _service(request)
    req = door.parse(RestoreRequest, await request.body(), "/checkpoint/restore")
    names = [c.name for c in checkpoints(Path(service.settings.training_dir))]
    if req.filename not in names:
        raise HTTPException(404, f"no checkpoint {req.filename!r}; there are {names[-10:]} "
                                 "(GET /checkpoints)")
    return JSONResponse(await _ask(service, "restore", filename=req.filename))


async def _ask(service: TrainingService, op: str, **fields: str) -> dict:
    try:
        reply = await service.request(op, **fields)
    except (Busy, TrainingUnavailable) as e:
        raise _refused(e) from None
    except asyncio.TimeoutError:
        raise HTTPException(504, f"the training worker did not answer {op} in time") from None
    if not reply["ok"]:  # a checkpoint that does not load is the caller's pick; a write is ours
        raise HTTPException(422 if op == "restore" else 500, f"{op} failed: {reply['error']}")
    return {k: v for k, v in reply.items() if k not in ("event", "req_id", "ok")}


ROUTES = (("POST", "/train", train), ("GET", "/status/{job_id}", job_status),
          ("GET", "/train/status", train_status), ("POST", "/checkpoint", checkpoint),
          ("GET", "/checkpoints", list_checkpoints),
          ("POST", "/checkpoint/restore", restore))
