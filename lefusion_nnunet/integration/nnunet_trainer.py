"""``LeFusionTrainer``: nnU-Net's trainer, training on synthetic lesions in lesion-free training cases.

Use it like any nnU-Net trainer once it is registered (``lefusion install-trainer``, or
``export nnUNet_extTrainer=$(lefusion trainer-dir)`` where torchvision imports)::

    nnUNetv2_train DATASET 3d_fullres FOLD -tr LeFusionTrainer
    nnUNetv2_predict -i IN -o OUT -d DATASET -c 3d_fullres -f FOLD -tr LeFusionTrainer

What differs from ``nnUNetTrainer`` (nothing else is overridden):

- ``get_tr_and_val_datasets``: the synthetic bank of this fold's training split is reused, or its inputs are
  checked (one-sentence errors before any work) and it is built (:mod:`lefusion_nnunet.integration.bank`); the
  training dataset is wrapped so that a drawn lesion-free case is replaced by one of its K variants with
  probability P. The validation dataset, the final validation and its metrics are real-only. By default
  (``bank_build = "background"``) the bank is built in a background thread started by ``on_train_start`` once the
  loaders exist (rank 0 only under DDP), and training starts at once: a lesion-free case loads as the real case
  until all its variants are stored (:meth:`SyntheticSwapDataset.growing`); the input checks (they read every
  label and image voxel of the lesion-free cases) are then the thread's first step. ``"before-training"`` checks
  and builds the whole bank first.
- ``train_step`` / ``on_epoch_end``: raise a failed background build's exception (or its input error) at the next
  iteration (training never goes on real-only unnoticed).
- ``on_train_end``: waits for a background build still running (so later runs reuse the bank; under DDP it does not
  wait, as the other ranks head for nnU-Net's validation barriers, and the next run continues it), then logs how many
  loads used a synthetic case (from ``<output_folder>/lefusion_draws.log``).

Every nnU-Net setup works: any plans (``-p nnUNetResEncUNetMPlans`` etc.; the bank is keyed by plans and
configuration), ``2d``, ``3d_fullres``, ``3d_lowres``, region-based labels, ``--c`` (the bank is reused),
``--val`` (no bank needed) and ``nnUNetv2_predict``. The cascade (``3d_cascade_fullres``) is refused when the
trainer is built: its input includes the 3d_lowres prediction of each case, which would not show the synthetic
lesion (``tests/test_nnunet_setups.py`` runs each of these with nnU-Net's own commands).

While the bank is built, a progress line (done/total variants, s per variant, ETA) goes to nnU-Net's log
after the first chunk of cases, then every :data:`PROGRESS_SECONDS` and at the end.

Settings come from ``lefusion_trainer.json`` and ``LEFUSION_*`` environment variables
(:mod:`lefusion_nnunet.integration.trainer_settings`), because nnU-Net's trainer ``__init__`` takes no extra
arguments. ``LEFUSION_ITERATIONS_PER_EPOCH`` / ``LEFUSION_VAL_ITERATIONS_PER_EPOCH`` shorten epochs for
smoke tests (nnU-Net's defaults are 250 / 50).
"""
from __future__ import annotations

import dataclasses
import os
import time
from os.path import join
from typing import Callable

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import empty_cache

from lefusion_nnunet.checkpoints.loaders import checkpoint_data_config
from lefusion_nnunet.data.dataset import load_raw_dataset
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.integration import bank as _bank
from lefusion_nnunet.integration.bank_build import BankBuild
from lefusion_nnunet.integration.swap_dataset import SyntheticSwapDataset, read_draws
from lefusion_nnunet.integration.trainer_settings import ENV_BANK_BUILD, load_trainer_settings, resolve_checkpoint
from lefusion_nnunet.paths import find_default_checkpoint
from lefusion_nnunet.utils import sha256_file
from lefusion_nnunet.validation import validate_variant_inputs

__all__ = ["LeFusionTrainer", "LeFusionTrainer_1epoch", "LeFusionTrainer_5epochs", "LeFusionTrainer_p025",
           "LeFusionTrainer_p075", "BankProgress", "PROGRESS_SECONDS"]

#: Seconds between two progress lines of a bank build in nnU-Net's log.
PROGRESS_SECONDS = 30.0


class BankProgress:
    """Progress of a bank build as log lines: ``done/total`` variants, seconds per variant and the ETA.

    :meth:`add` is called with the number of variants each chunk of source cases gave; a line is logged after the
    first chunk, then at most every ``every_seconds`` and when ``total`` is reached; :meth:`finish` logs the final
    count if no line showed it (skipped variants never reach ``total``). Variants kept from an interrupted build
    (``add(n, kept=True)``) count as done but log nothing and are not timed. Times are wall-clock seconds from
    :meth:`restart` (called once the lesion model is loaded), so they include nnU-Net's preprocessing of each
    variant.
    """

    def __init__(self, total: int, log: Callable[[str], None], every_seconds: float = PROGRESS_SECONDS,
                 clock: Callable[[], float] = time.perf_counter):
        self.total, self.done, self.log, self.every, self.clock = int(total), 0, log, float(every_seconds), clock
        self.lines, self._logged, self._kept = 0, -1, 0
        self.restart()

    def restart(self) -> None:
        """Start timing now."""
        self.start = self._last = self.clock()

    def add(self, n: int, kept: bool = False) -> None:
        """``n`` more variants were handled (a chunk's), or were ``kept`` from an interrupted build."""
        self.done += int(n)
        if kept:
            self._kept += int(n)
            return
        now = self.clock()
        if self.lines and self.done < self.total and now - self._last < self.every:
            return
        self._line(now)

    def finish(self) -> None:
        """Log the final count unless the last line already showed it."""
        if self.done != self._logged:
            self._line(self.clock())

    def _line(self, now: float) -> None:
        self._last, self.lines, self._logged = now, self.lines + 1, self.done
        per = (now - self.start) / max(self.done - self._kept, 1)
        eta = per * max(self.total - self.done, 0)
        share = 100 * self.done / max(self.total, 1)
        self.log(f"LeFusion bank progress: {self.done}/{self.total} variants ({share:.0f} %), {per:.2f} s per "
                 f"variant, ETA {eta:.0f} s")


class LeFusionTrainer(nnUNetTrainer):
    """nnU-Net trainer that swaps lesion-free training cases for LeFusion variants with probability P."""

    #: When set, overrides the settings' probability P (used by the ``_pXXX`` variants).
    lefusion_probability: float | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        settings = load_trainer_settings(self.plans_manager.dataset_name, require_checkpoint=False)
        if self.lefusion_probability is not None:
            settings = dataclasses.replace(settings, probability=self.lefusion_probability)
        if self.is_cascaded and settings.probability > 0:
            message = (f"LeFusionTrainer does not support nnU-Net's cascade ({configuration} takes the "
                       f"{self.configuration_manager.previous_stage_name} prediction of each case as input, which "
                       f"would not show a synthetic lesion); train 3d_fullres or 3d_lowres with LeFusionTrainer, or "
                       f"the cascade with nnUNetTrainer.")
            self.print_to_log_file(f"LeFusion: error: {message}")
            raise LeFusionInputError(message)
        self.lefusion_settings = settings
        for name in ("num_iterations_per_epoch", "num_val_iterations_per_epoch"):
            if getattr(settings, name) is not None:
                setattr(self, name, getattr(settings, name))
                self.print_to_log_file(f"LeFusion settings: {name} = {getattr(settings, name)}")
        self.lefusion_bank: _bank.SyntheticBank | None = None  # the complete bank (once built, in background mode)
        self.lefusion_build: BankBuild | None = None  # background mode: the build (started in on_train_start)
        self.lefusion_draws_log = join(self.output_folder, _bank.DRAWS_LOG_NAME) if self.output_folder else None
        self._lefusion_draws_offset = 0
        self._lefusion_swapping = False
        self._lefusion_progress: BankProgress | None = None

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        return self._lefusion_wrap(dataset_tr), dataset_val

    def on_train_start(self):
        super().on_train_start()  # loaders (and their forked workers) exist before the build thread starts
        build = self.lefusion_build
        if build is None:
            return
        if build.start():  # announced here, not by the thread: nnU-Net prints console lines piecewise
            self.print_to_log_file(self._lefusion_building_line(len(build.spec.case_ids)))
        else:
            self.print_to_log_file(f"LeFusion: another process is building the bank {build.folder}; training "
                                   f"takes up its variants as they are made")

    def train_step(self, batch: dict) -> dict:
        self._lefusion_raise_build_error()  # a failed background build stops training at the next iteration
        return super().train_step(batch)

    def on_epoch_end(self):
        self._lefusion_raise_build_error()
        super().on_epoch_end()

    def on_train_end(self):
        self._lefusion_raise_build_error()
        super().on_train_end()
        build = self.lefusion_build
        if build is not None and not build.done:
            progress = self._lefusion_progress
            made = f"{progress.done}/{progress.total} variants made" if progress is not None else "running"
            if self.is_ddp:  # the other ranks go on to nnU-Net's final-validation barriers: waiting could time out
                self.print_to_log_file(f"LeFusion: training ended before the bank was complete ({made}); under "
                                       f"DDP rank 0 does not wait: the build goes on while the process validates, "
                                       f"and the next run continues what is unfinished in {build.folder}")
                build = None
            else:
                self.print_to_log_file(f"LeFusion: training ended before the bank was complete ({made}); waiting "
                                       f"for the build to finish so that later runs reuse the bank {build.folder}")
        if build is not None:
            build.join()
            self._lefusion_raise_build_error()
        if self._lefusion_swapping and self.lefusion_draws_log is not None:
            stats = read_draws(self.lefusion_draws_log, self._lefusion_draws_offset)
            self.print_to_log_file(
                f"LeFusion: {stats.synthetic} of {stats.loads} training case loads used a synthetic case "
                f"({stats.distinct_variants} distinct variants of {len(stats.sources)} source cases; "
                f"draws log {self.lefusion_draws_log})")

    # -------------------------------------------------------------------------------------------- LeFusion

    def _lefusion_raise_build_error(self) -> None:
        """Raise a failed background build's exception here, in the training thread (it was logged there)."""
        build = self.lefusion_build
        if build is not None and build.error is not None:
            error, build.error = build.error, None
            self.print_to_log_file("LeFusion: error: stopping training because the background bank build failed "
                                   "(see above); fix the cause and rerun (finished source cases are kept)")
            raise error

    def _lefusion_wrap(self, dataset_tr):
        settings = self.lefusion_settings
        if settings.probability == 0:
            self.print_to_log_file("LeFusion: probability 0; training on real cases only")
            return dataset_tr
        settings = resolve_checkpoint(settings, self.plans_manager.dataset_name)
        self.lefusion_settings = settings
        plan = self._lefusion_plan(settings, list(dataset_tr.identifiers))
        if plan is None:
            self.print_to_log_file("LeFusion: the training split has no lesion-free case; training on real cases "
                                   "only")
            return dataset_tr
        spec, root, build = plan
        if self.lefusion_draws_log is not None and os.path.isfile(self.lefusion_draws_log):
            self._lefusion_draws_offset = os.path.getsize(self.lefusion_draws_log)
        background = settings.bank_build == "background"
        bank = _bank.SyntheticBank.load(join(root, spec.key), spec.key)
        if bank is None and background:
            return self._lefusion_growing(dataset_tr, spec, root, build)
        if not background and (bank is None or self.is_ddp):  # DDP: every rank passes ensure_bank's barriers
            barrier = None
            if self.is_ddp:
                from torch import distributed as dist

                barrier = dist.barrier
            bank = _bank.ensure_bank(spec, root, build, rank=self.local_rank, barrier=barrier,
                                     log=lambda msg: self.print_to_log_file(msg))
            empty_cache(self.device)
        self._lefusion_bank_ready(bank, len(dataset_tr.identifiers))
        if bank.num_variants == 0:
            self.print_to_log_file("LeFusion: no synthetic cases in the bank; training on real cases only")
            return dataset_tr
        self._lefusion_swapping = True
        return SyntheticSwapDataset(dataset_tr, bank, settings.probability, self.lefusion_draws_log)

    def _lefusion_growing(self, dataset_tr, spec: _bank.BankSpec, root: str, build) -> SyntheticSwapDataset:
        """Background mode, bank incomplete: the growing dataset now; rank 0 builds once the loaders exist."""
        settings, n_train = self.lefusion_settings, len(dataset_tr.identifiers)
        self.print_to_log_file(
            f"LeFusion: the synthetic bank {join(root, spec.key)} is built in the background; training starts now "
            f"and each of the {len(spec.case_ids)} lesion-free training cases (of {n_train}) is replaced by one of "
            f"its variants with probability {settings.probability} once they are made (real until then; "
            f"{ENV_BANK_BUILD}=before-training builds the whole bank first)")
        if self.local_rank == 0:
            self.lefusion_build = BankBuild(spec, root, build, lambda msg: self.print_to_log_file(msg),
                                            on_done=lambda bank: self._lefusion_bank_ready(bank, n_train, True))
        self._lefusion_swapping = True
        return SyntheticSwapDataset.growing(dataset_tr, join(root, spec.key), spec.key, settings.probability,
                                            self.lefusion_draws_log)

    def _lefusion_bank_ready(self, bank: _bank.SyntheticBank, n_train: int, background: bool = False) -> None:
        """Log the bank's summary line and warnings; keep it as :attr:`lefusion_bank`."""
        self.lefusion_bank = bank
        how = (f"built in {bank.build_seconds:.1f} s" + (" in the background" if background else "")
               if bank.built else "reused")
        self.print_to_log_file(
            f"LeFusion: {bank.num_variants} synthetic cases of {len(bank.variants_by_source)} lesion-free training "
            f"cases (of {n_train}) replace their source with probability {self.lefusion_settings.probability}; "
            f"bank {bank.folder} ({how}, {len(bank.warnings)} warnings)")
        for warning in bank.warnings[:20]:
            self.print_to_log_file(f"LeFusion warning: {warning}")

    def _lefusion_validate(self, settings, data, free: list[str], raw=None) -> None:
        """Every input problem of the bank build as one sentence, before any variant is made: the raw dataset, the
        checkpoint's fit to it (labels, modality, channel), region label / masks, and the images to be read (every
        voxel: about 1.5 s per 512 x 512 x 128 case, so in background mode the build thread does it first); the
        sentence also goes to nnU-Net's log."""
        try:
            validate_variant_inputs(raw if raw is not None else load_raw_dataset(self.plans_manager.dataset_name),
                                    data, settings.variants, cases=free)
        except LeFusionInputError as exc:
            self.print_to_log_file(f"LeFusion: error: {exc}")
            raise

    def _lefusion_plan(self, settings, train_keys: list[str]) -> tuple[_bank.BankSpec, str, _bank.BuildFn] | None:
        """The bank's spec, its root folder and the function that builds it (inputs validated when a build is
        needed); None when the training split has no lesion-free case."""
        data = checkpoint_data_config(settings.checkpoint, expected_kind="lesion")
        labels = tuple(int(v) for v in data.lesion_labels)
        free = _bank.lesion_free_cases(self.preprocessed_dataset_folder, train_keys, labels)
        if not free:
            return None
        mask_sha = None
        if settings.variants.mask_source == "diffusion":  # a retrained mask model must rebuild the bank

            mask_sha = sha256_file(settings.variants.mask_checkpoint
                                   or find_default_checkpoint(self.plans_manager.dataset_name, kind="mask"))
        spec = _bank.BankSpec(
            checkpoint_sha256=sha256_file(settings.checkpoint), variants=settings.variants.to_dict(),
            fold=str(self.fold), configuration=self.configuration_name, plans_name=self.plans_manager.plans_name,
            data_identifier=self.configuration_manager.data_identifier,
            plans_sha256=_bank.plans_sha256(self.plans_manager.plans, self.configuration_name, self.dataset_json),
            lesion_labels=labels, case_ids=tuple(free), mask_checkpoint_sha256=mask_sha)
        root = join(self.preprocessed_dataset_folder_base, _bank.BANK_FOLDER)
        if _bank.SyntheticBank.load(join(root, spec.key), spec.key) is None:  # a build is needed: check first
            if settings.bank_build != "background":
                self._lefusion_validate(settings, data, free)
        return spec, root, self._lefusion_build_fn(settings, data, free)

    def _lefusion_building_line(self, n_cases: int) -> str:
        settings = self.lefusion_settings
        device = str(self.device) if settings.device == "auto" else settings.device
        where = " in the background" if settings.bank_build == "background" else ""
        return (f"LeFusion: building the synthetic bank ({settings.variants.per_case} variants for each of "
                f"{n_cases} lesion-free training cases) on {device}{where}")

    def _lefusion_build_fn(self, settings, data, free: list[str]) -> _bank.BuildFn:
        """``build(folder)`` for the bank of ``free``: the settings' synthesizer, nnU-Net's preprocessing of this
        run, progress lines in nnU-Net's log."""
        device = str(self.device) if settings.device == "auto" else settings.device

        def build(folder):
            if settings.bank_build != "background":  # (background: announced by on_train_start)
                self.print_to_log_file(self._lefusion_building_line(len(free)))
            raw = load_raw_dataset(self.plans_manager.dataset_name)
            if settings.bank_build == "background":  # checked here, off the path to the first iteration
                self._lefusion_validate(settings, data, free, raw)
            progress = self._lefusion_progress = BankProgress(settings.variants.per_case * len(free),
                                                              self.print_to_log_file)

            def synthesizer():
                synth = _bank.make_synthesizer(settings.checkpoint, settings.variants, device, settings.batch_size)
                progress.restart()  # time the variants, not the model's loading
                return synth

            contents = _bank.build_bank_contents(
                folder, synthesizer_factory=synthesizer,
                raw_dataset=raw, case_ids=free, variant_settings=settings.variants,
                plans_manager=self.plans_manager, configuration_manager=self.configuration_manager,
                dataset_json=self.dataset_json, dataset_class=self.dataset_class,
                preprocessed_folder=self.preprocessed_dataset_folder, log=lambda msg: self.print_to_log_file(msg),
                progress=progress.add)
            if progress.lines:
                progress.finish()
            return contents

        return build


class LeFusionTrainer_1epoch(LeFusionTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1


class LeFusionTrainer_5epochs(LeFusionTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class LeFusionTrainer_p025(LeFusionTrainer):
    lefusion_probability = 0.25


class LeFusionTrainer_p075(LeFusionTrainer):
    lefusion_probability = 0.75
