"""`python -m flmm.foundation` (`make foundation`): rebuild the shipped foundation models
(:func:`flmm.foundation.build.build`, configured by conf/foundation.yaml)."""

from omegaconf import DictConfig

from flmm.entry import hydra_entry
from flmm.errors import exit_on_user_error
from flmm.foundation.build import build


@hydra_entry("foundation")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(build, cfg)


if __name__ == "__main__":
    main()
