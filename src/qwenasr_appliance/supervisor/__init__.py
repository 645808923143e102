"""The engine supervisor: VRAM probe, load plans with fallbacks, background loading and restarts."""

from qwenasr_appliance.supervisor.factory import EngineFactory, default_engine_factory
from qwenasr_appliance.supervisor.plans import NoPlanError, Plan, plan_chain
from qwenasr_appliance.supervisor.probe import GpuInfo, VramProbe, probe_vram
from qwenasr_appliance.supervisor.status import Attempt, SupervisorStatus
from qwenasr_appliance.supervisor.supervisor import EngineSupervisor, EngineUnavailable, SupervisorState

__all__ = [
    "Attempt",
    "EngineFactory",
    "EngineSupervisor",
    "EngineUnavailable",
    "GpuInfo",
    "NoPlanError",
    "Plan",
    "SupervisorState",
    "SupervisorStatus",
    "VramProbe",
    "default_engine_factory",
    "plan_chain",
    "probe_vram",
]
