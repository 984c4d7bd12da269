"""The core training datum: :class:`PolicyBatch`, the inputs of one forward pass of the policy (token ids,
response mask, images in the per-row or the shared layout), and how it is selected and split."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nemo_viper.data.images import check_patches


@dataclass
class PolicyBatch:
    """Inputs of one forward pass: right-padded token ids, the response mask, and the images.

    Images come in one of two layouts:

    - per row (``image_sets=None``): ``pixel_values`` holds the patches of every row's images in row order
      (row 0's images first), ``image_grid_thw`` one ``(t, h, w)`` row per image;
    - shared (``image_sets`` [B] long): row ``i`` shows image set ``image_sets[i]`` (``-1``: no images);
      ``pixel_values`` / ``image_grid_thw`` hold the sets ``0, 1, ...`` in order, each once. A GRPO
      rollout stores a prompt's images once for its ``n`` responses this way.

    ``images_per_row`` [B] long (required with images) is how many images each row shows, counted once where
    the batch is assembled (a rollout: its request's images; processor output: the row's
    ``<|vision_start|>`` tokens, :func:`count_images`); selecting and splitting need no token ids. Rows
    showing the same set show the same number of images. :meth:`select` keeps the
    layout (shared sets are gathered once, not per row). :func:`forward_micro_batch` runs the vision tower
    once per stored image and scatters the features into every row that shows it; :meth:`model_inputs`
    is the per-row form of the same inputs (each row's own copy of its images).
    """

    input_ids: Tensor  # [B, S] long, right-padded
    response_mask: Tensor  # [B, S] bool/int: 1 where the log-prob of x_t is wanted
    pixel_values: Tensor | None = None  # [sum of t*h*w over images, C*patch volume]
    image_grid_thw: Tensor | None = None  # [num_images, 3]
    image_sets: Tensor | None = None  # [B] long, shared layout only
    images_per_row: Tensor | None = None  # [B] long, with images only

    def __post_init__(self):
        if self.input_ids.shape != self.response_mask.shape:
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)} and response_mask "
                f"{tuple(self.response_mask.shape)} must have the same shape"
            )
        check_patches(self.pixel_values, self.image_grid_thw)
        if self.image_sets is not None and self.image_sets.shape != self.input_ids.shape[:1]:
            raise ValueError(f"image_sets has shape {tuple(self.image_sets.shape)}, expected ({self.input_ids.shape[0]},)")
        if (self.image_grid_thw is None) != (self.images_per_row is None):
            raise ValueError("images_per_row is required with images (image_grid_thw) and only with them")
        if self.images_per_row is not None and self.images_per_row.shape != self.input_ids.shape[:1]:
            raise ValueError(
                f"images_per_row has shape {tuple(self.images_per_row.shape)}, expected ({self.input_ids.shape[0]},)")

    def select(self, rows) -> PolicyBatch:
        """The samples at ``rows`` (indices or a slice), each with exactly its own images, in the same layout."""
        input_ids, response_mask = self.input_ids[rows], self.response_mask[rows]
        if self.image_grid_thw is None:
            return PolicyBatch(input_ids, response_mask)
        sets, set_sizes = self.image_set_sizes()
        images_per_row = self.images_per_row[rows]
        if self.image_sets is None:  # per row: the selected rows' images, in order
            pixel_values, grid = self._gather(sets[rows].reshape(-1), set_sizes)
            if len(grid) == 0:
                return PolicyBatch(input_ids, response_mask)
            return PolicyBatch(input_ids, response_mask, pixel_values, grid, images_per_row=images_per_row)
        selected = sets[rows].reshape(-1)
        used = selected[selected >= 0]
        if used.numel() == 0:
            return PolicyBatch(input_ids, response_mask)
        order = torch.unique(used, sorted=True)  # renumber the sets that are still shown
        renumber = torch.full((len(set_sizes),), -1, dtype=torch.long)
        renumber[order] = torch.arange(len(order))
        pixel_values, grid = self._gather(order, set_sizes)
        image_sets = torch.where(selected >= 0, renumber[selected.clamp(min=0)], -1)
        return PolicyBatch(input_ids, response_mask, pixel_values, grid, image_sets, images_per_row)

    def pad_columns(self, multiple: int, pad_token_id: int = 0) -> PolicyBatch:
        """This batch with its token dimension right-padded to a multiple of ``multiple`` (pad tokens, response
        mask 0): Transformer Engine's FP8 GEMMs need aligned token counts. Under causal attention padding
        after a row's tokens changes none of their outputs, and the mask keeps it out of log-probs and loss."""
        missing = -self.input_ids.shape[1] % multiple
        if missing == 0:
            return self
        ids = torch.nn.functional.pad(self.input_ids, (0, missing), value=pad_token_id)
        mask = torch.nn.functional.pad(self.response_mask, (0, missing))
        return PolicyBatch(ids, mask, self.pixel_values, self.image_grid_thw, self.image_sets, self.images_per_row)

    def split(self, micro_batch_size: int) -> list[PolicyBatch]:
        """Consecutive micro-batches of ``micro_batch_size`` samples (the last may be smaller)."""
        batch_size = self.input_ids.shape[0]
        return [
            self.select(slice(start, start + micro_batch_size))
            for start in range(0, batch_size, micro_batch_size)
        ]

    def model_inputs(self, device: torch.device) -> dict:
        """The keyword arguments of the Megatron Qwen2.5-VL forward, images per row, on ``device``."""
        inputs = {"input_ids": self.input_ids.to(device), "position_ids": None, "attention_mask": None}
        if self.image_grid_thw is None:
            return inputs
        pixel_values, grid = self.pixel_values, self.image_grid_thw
        if self.image_sets is not None:
            sets, set_sizes = self.image_set_sizes()
            pixel_values, grid = self._gather(sets, set_sizes)
        if len(grid):
            inputs.update(pixel_values=pixel_values.to(device), image_grid_thw=grid.to(device))
        return inputs

    def image_set_sizes(self) -> tuple[Tensor, Tensor]:
        """``(image set of each row, images per set)``; checks them against ``images_per_row``."""
        images_per_row = self.images_per_row.long().cpu()
        if self.image_sets is None:
            sets, set_sizes = torch.arange(len(images_per_row)), images_per_row
        else:
            sets = self.image_sets.long().cpu()
            shown = sets >= 0
            set_sizes = torch.zeros(int(sets.max()) + 1 if shown.any() else 0, dtype=torch.long)
            set_sizes[sets[shown]] = images_per_row[shown]
            if (images_per_row[~shown] != 0).any() or (set_sizes[sets[shown]] != images_per_row[shown]).any():
                raise ValueError("rows showing the same image set (image_sets) contain different numbers of images")
        if int(set_sizes.sum()) != self.image_grid_thw.shape[0]:
            raise ValueError(
                f"images_per_row counts {int(set_sizes.sum())} images but image_grid_thw has "
                f"{self.image_grid_thw.shape[0]} rows"
            )
        return sets, set_sizes

    def stored_image_index(self, sets: Tensor, set_sizes: Tensor) -> Tensor:
        """Indices of the stored images shown by ``sets`` (image set ids, in order, repeats allowed; ``-1``
        skipped): the stored images each row shows, in row order."""
        sets = sets[sets >= 0]
        return concat_ranges(torch.cumsum(set_sizes, 0) - set_sizes, set_sizes, sets)

    def _gather(self, sets: Tensor, set_sizes: Tensor) -> tuple[Tensor, Tensor]:
        """The images of ``sets`` (image set ids, in order, repeats allowed; ``-1`` skipped), concatenated."""
        patches_per_image = self.image_grid_thw.prod(dim=-1).cpu()
        image_index = self.stored_image_index(sets, set_sizes)
        patch_index = concat_ranges(torch.cumsum(patches_per_image, 0) - patches_per_image, patches_per_image, image_index)
        return (self.pixel_values[patch_index.to(self.pixel_values.device)],
                self.image_grid_thw[image_index.to(self.image_grid_thw.device)])


def count_images(input_ids: Tensor, vision_start_token_id: int) -> Tensor:
    """``images_per_row`` of token ids as the processor writes them: one ``<|vision_start|>`` per image."""
    return (input_ids == vision_start_token_id).sum(dim=1)


def concat_ranges(starts: Tensor, counts: Tensor, items: Tensor) -> Tensor:
    """``cat([arange(starts[k], starts[k] + counts[k]) for k in items])``, without a Python loop."""
    counts = counts[items]
    offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return torch.repeat_interleave(starts[items], counts) + offsets
