"""img2img samplers numerically identical to their diffusers 0.42 classes, without diffusers or scipy.

Usage: `sched = make_scheduler("euler_a", scheduler_config_dict)`,
`run = sched.start(steps, strength, device)`, `x = run.add_noise(z0, noise)`, then for each `i, t` in
`enumerate(run.timesteps)`: `x = run.step(unet(run.scale_model_input(x, i), t), i, x, generators)`.
"""

from sd_core.schedulers.config import SchedulerConfig
from sd_core.schedulers.run import SchedulerRun
from sd_core.schedulers.scheduler import SCHEDULER_NAMES, Scheduler, default_scheduler_name, make_scheduler

__all__ = [
    "SCHEDULER_NAMES",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerRun",
    "default_scheduler_name",
    "make_scheduler",
]
