"""What the passes need to know about the device mesh: axis names and sizes, this rank's place,
and the process group of each axis (by name, as generated code passes groups)."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod


@dataclass(frozen=True)
class MeshInfo:
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    coords: tuple[int, ...]        # this rank's index along each axis
    groups: tuple[str, ...]        # process-group name of each axis ("" for a virtual mesh)
    world_group: str = ""          # every rank of the mesh

    @property
    def world(self) -> int:
        return prod(self.sizes)

    @staticmethod
    def virtual(mesh: tuple[tuple[str, int], ...], coords: tuple[int, ...] | None = None) -> "MeshInfo":
        names, sizes = zip(*mesh) if mesh else ((), ())
        return MeshInfo(tuple(names), tuple(sizes), coords or (0,) * len(sizes), ("",) * len(sizes))

    @staticmethod
    def from_device_mesh(mesh) -> "MeshInfo":
        import torch.distributed as dist

        names = mesh.mesh_dim_names or tuple(f"axis{i}" for i in range(mesh.ndim))
        sizes = tuple(mesh.size(i) for i in range(mesh.ndim))
        coords = tuple(mesh.get_coordinate())
        groups = tuple(mesh.get_group(i).group_name for i in range(mesh.ndim))
        world = dist.group.WORLD if prod(sizes) == dist.get_world_size() else None
        if world is None:
            raise ValueError(f"the mesh {sizes} does not cover all {dist.get_world_size()} ranks; "
                             "seqshard needs a mesh over the whole process group")
        return MeshInfo(tuple(names), sizes, coords, groups, world.group_name)
