"""params.yaml as typed, validated configuration.

Budget keys (how long things run) live only under `profiles.<name>`; every
other key lives at the top level. `resolve` merges the chosen profile over
the top level, so `dvc exp run -S profile=paper` switches every budget at
once while `-S attack.boost=5` still reaches the one knob it names.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedmeta.errors import FedmetaError, first_line

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Prob = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
PosFloat = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
# Adam's step per update; above 1 no run stays finite
LearningRate = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
MAX_BOOST = 1e6  # λ beyond this overflows float32 updates long before it could mean anything
MIN_IMAGE_SIDE = 16  # Conv4's four 2×2 max-pools (model.BLOCKS) leave at least one pixel: 16 → 1
MAX_IMAGE_SIDE = 1024  # beyond this the image tensor alone outgrows any machine this runs on
ImageSide = Annotated[int, Field(ge=MIN_IMAGE_SIDE, le=MAX_IMAGE_SIDE)]
MIN_KEY_SIDE = 2  # pixels: a smaller key is no pattern (key.key_pattern)
# Counts that size a tensor held at once: every evaluation episode is fine-tuned together, a meta-batch's episodes
# adapt together, and a run's inner mini-batch indices are drawn up front; beyond these bounds no machine holds them
# and a stage would hang in allocation instead of failing.
MAX_EVAL_EPISODES = 10_000  # paper: 40; also the most `fedmeta meta-test --episodes` takes
MAX_META_BATCH = 1_000  # paper: 5
MAX_STEPS = 100_000  # inner or fine-tuning steps of one episode (paper: 10 and 500)
# At least 2: every accuracy is reported with its 95% interval over episodes, and one episode has none (its
# half-width would print as 0, a certainty it does not have).
MIN_EVAL_EPISODES = 2
EvalEpisodes = Annotated[int, Field(ge=MIN_EVAL_EPISODES, le=MAX_EVAL_EPISODES)]
Steps = Annotated[int, Field(gt=0, le=MAX_STEPS)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Budget(Strict):
    """Everything that sets how long the pipeline runs; one set per profile."""

    width: Annotated[int, Field(gt=0, le=1024)]  # Conv4 filters (paper: 64)
    pretrain_rounds: PosInt
    episodes_per_round: PosInt  # E: Reptile episodes per user per round (paper: 1000 Omniglot, 100 mini-ImageNet)
    attack_episodes: PosInt  # attacker's E (paper: 50000 Omniglot, 150000 mini-ImageNet)
    attack_inner_epochs: Steps  # passes over each poisoned episode's examples (paper: 50 Omniglot, 1 mini-ImageNet)
    continuation_rounds: PosInt  # Experiment 1 (paper: 50 Omniglot, 100 mini-ImageNet)
    finetune_steps: Steps  # Experiments 2-3 (paper: 500)
    record_every: PosInt  # fine-tuning steps between recorded points
    eval_episodes: EvalEpisodes  # paper: 40
    checkpoint_every: PosInt  # rounds (attack: meta-batches) between resumable checkpoints
    pretrain_eval_every: PosInt  # rounds between meta-test points on the pretraining curve
    continuation_eval_every: PosInt = 1  # Experiment 1: benign rounds between measured points (the last is measured)
    outer_step: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]  # Reptile's ε (paper: 0.1)
    inner_lr: LearningRate  # Adam's η in benign meta-training (paper: 0.001); evaluation keeps evaluation.lr
    # Experiment 1's benign rounds after the attack at another ε and η (null: outer_step and inner_lr), so that the
    # paper's ε = 0.1, η = 0.001 can follow a model pretrained at quick's ε = 1, η = 0.003 (docs/depth.md)
    continuation_outer_step: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    continuation_inner_lr: LearningRate | None = None

    def continuation(self) -> Budget:
        """This budget with Experiment 1's ε and η in place of pretraining's."""
        return self.model_copy(
            update={
                "outer_step": self.continuation_outer_step or self.outer_step,
                "inner_lr": self.continuation_inner_lr or self.inner_lr,
            }
        )


class OmniglotData(Strict):
    source: str = "download"  # "download" (cached in data/raw/omniglot/, data/README.md) or a folder of archives
    archives: list[str] = Field(min_length=1)
    image_size: ImageSide = 28
    rotations: bool = True


class MiniImageNetData(Strict):
    source: str  # folder in one of the supported layouts
    image_size: ImageSide = 84


class DatasetSpec(Strict):
    """What the paper sets per dataset: split sizes, attack classes and the attacker's mix."""

    # used when the dataset has no fixed split (Omniglot: 418/1618)
    meta_test_fraction: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)]
    validation_per_class: PosInt  # held-out examples per meta-training class
    backdoor_classes: PosInt
    benign_examples: PosInt  # per attack class, given to benign users
    attacker_examples: PosInt  # per attack class: X_T (target) or stamped X_B (backdoor)
    validation_examples: PosInt  # per backdoor class, stamped, never trained on
    train_shots: PosInt  # K of meta-training episodes (paper: 10 Omniglot, 15 mini-ImageNet)
    # X_B : X_T among the target's shots in a poisoned episode
    ratio: Annotated[tuple[PosInt, PosInt], Field(strict=False)]


class Key(Strict):
    """The backdoor key stamped on X_B: a pattern at a position, sized relative to the image."""

    shape: Literal["square", "checkerboard", "cross"] = "checkerboard"
    size: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 0.25  # side as a fraction of the image side
    position: Literal["top_left", "top_right", "bottom_left", "bottom_right", "center"] = "bottom_right"
    intensity: Prob = 1.0  # pixel value of the pattern's bright cells, in [0, 1]


class Reptile(Strict):
    n_way: PosInt = 5
    meta_batch: Annotated[int, Field(gt=0, le=MAX_META_BATCH)] = 5  # B
    inner_steps: Steps = 10  # e
    inner_batch: PosInt = 10  # b
    beta2: Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)] = 0.999
    adam_state: Literal["episode", "carry"] = "episode"


def check_address(address: str) -> str:
    """host:port, as Flower's --superlink takes it."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        raise ValueError("expected host:port, e.g. server.example:9200")
    return address


class FlowerEngine(Strict):
    """Flower's deployment runtime (federation.engine: flower): started on 127.0.0.1 for each stage, or a SuperLink
    already running with one `fedmeta node` per user (superlink); see docs/flower.md."""

    port: Annotated[int, Field(ge=1024, le=65000)] = 9200  # SuperLink's; SuperNode i listens on port + 1 + i
    # host:port of a running SuperLink whose SuperNodes are `fedmeta node` processes; null: start one on 127.0.0.1
    superlink: Annotated[str, AfterValidator(check_address)] | None = None
    # PEM file of the CA that signed the SuperLink's TLS certificate; null: an unencrypted connection
    root_certificates: str | None = None
    # seconds a round may take before it fails
    round_timeout: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 3600.0
    # SecAgg+ (secure_aggregation: true) clips each coordinate of every upload to ±clipping_range before quantizing;
    # null: 8 × max(1, attack.boost), Flower's default range for a plain update times the boost (docs/flower.md)
    clipping_range: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None


Aggregator = Literal["mean", "norm_clip", "median", "trimmed_mean", "multi_krum", "flame"]
Head = Literal["shared", "zero", "prototype"]  # how a user's fine-tuning starts its classifier (fedmeta.head)
AGGREGATORS: tuple[str, ...] = get_args(Aggregator)
NEEDS_EACH_UPDATE = ("median", "trimmed_mean", "multi_krum", "flame")  # what secure aggregation hides from the server
NonNegFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class NormClip(Strict):
    """Sun et al. 2019: norm bound and weak differential privacy."""

    clip_norm: PosFloat = 1.0  # L2 bound on each δ_i
    noise: NonNegFloat = 0.0  # std of the Gaussian noise added to the aggregate step; 0: none


class TrimmedMean(Strict):
    # fraction cut at each end (Yin et al. 2018)
    beta: Annotated[float, Field(ge=0.0, lt=0.5, allow_inf_nan=False)] = 0.34


class MultiKrum(Strict):
    f: NonNegInt = 0  # Byzantine users tolerated (Blanchard et al. 2017): needs min_updates > 2f + 2
    m: PosInt = 1  # updates kept and averaged; 1 is Krum


class Flame(Strict):
    # λ: the noise's std is λ·S, S the median update norm (Nguyen et al. 2022: 0.001 for images)
    noise: NonNegFloat = 0.001


class Federation(Strict):
    users: PosInt = 4  # M
    per_round: PosInt = 3  # M_r
    min_updates: PosInt = 3  # M_min
    weighting: Literal["uniform", "size"] = "uniform"
    attacker: NonNegInt = 0  # index of the attacker (the paper's user 1)
    aggregator: Aggregator = "mean"  # the server's rule (docs/experiment4.md)
    secure_aggregation: bool = False  # the server receives only pairwise-masked updates (Bonawitz et al. 2017)
    norm_clip: NormClip = NormClip()
    trimmed_mean: TrimmedMean = TrimmedMean()
    multi_krum: MultiKrum = MultiKrum()
    flame: Flame = Flame()
    # where rounds run: in this process, or through Flower in real processes
    engine: Literal["local", "flower"] = "local"
    flower: FlowerEngine = FlowerEngine()


def aggregation_problem(fed: Federation) -> str | None:
    """Why the aggregator cannot run on this federation, naming the keys; None when it can."""
    agg, n = fed.aggregator, fed.min_updates
    if fed.secure_aggregation and agg in NEEDS_EACH_UPDATE:
        return (
            f"federation.aggregator: {agg!r} needs each user's update, "
            "but federation.secure_aggregation: true gives the server "
            "only their masked sum; allowed with secure aggregation: mean, norm_clip (each client clips its own update)"
        )
    if agg in NEEDS_EACH_UPDATE and n < 3:
        return (
            f"federation.aggregator: {agg!r} needs at least 3 updates a round to outvote one, "
            f"but federation.min_updates = {n}; allowed: min_updates >= 3"
        )
    if agg == "trimmed_mean" and int(fed.trimmed_mean.beta * n) == 0:
        return (
            f"federation.trimmed_mean.beta: {fed.trimmed_mean.beta} "
            f"of federation.min_updates = {n} updates trims none; "
            f"allowed: at least 1/{n} (and below 0.5)"
        )
    k = fed.multi_krum
    if agg == "multi_krum" and n <= 2 * k.f + 2:
        return (
            f"federation.multi_krum.f: {k.f} needs federation.min_updates > 2f + 2 = {2 * k.f + 2}, "
            f"but it is {n}; allowed: f <= {(n - 3) // 2}"
        )
    if agg == "multi_krum" and k.m > n - k.f:
        return f"federation.multi_krum.m: {k.m} exceeds federation.min_updates - f = {n - k.f}; allowed: 1 to {n - k.f}"
    return None


AttackKind = Literal["oneshot", "neurotoxin", "repeated"]  # docs/attacks.md: each one's source and mechanics


class Attack(Strict):
    # oneshot: the paper's, round 1 only; neurotoxin: the same round, its steps off the benign update's largest
    # coordinates (Zhang et al. 2022); repeated: also every `every` rounds after it (multi-shot, fixed frequency)
    kind: AttackKind = "oneshot"
    boost: Annotated[float, Field(gt=0.0, le=MAX_BOOST, allow_inf_nan=False)] = 3.0  # λ
    lr: LearningRate = 0.001
    norm_bound: PosFloat | None = None  # adaptive attacker: its update rescaled to just under this L2 norm; null: naive
    target_output: Literal["fixed", "random"] = "fixed"  # the target's output in its episodes: N - 1, or random
    every: PosInt = 3  # repeated: the attacker takes part in rounds 1, 1 + every, 1 + 2·every, …
    # neurotoxin: % of coordinates masked, the largest in magnitude of the benign update (the paper's code: 1)
    neurotoxin_topk: Annotated[float, Field(gt=0.0, lt=100.0, allow_inf_nan=False)] = 1.0


class Override(Strict):
    """Experiment 4's changes to one federation: keys of `federation` and `attack`, as in params.yaml."""

    federation: dict[str, Any] = {}
    attack: dict[str, Any] = {}


class Experiment4(Strict):
    """What Experiment 4's DVC matrices run (dvc.yaml reads both): every listed rule on every federation."""

    aggregators: list[Aggregator] = list(AGGREGATORS)  # must hold `mean`: the baseline every rule is compared with
    rounds: PosInt | None = None  # benign rounds after the attack round; None: the profile's continuation_rounds
    federations: dict[str, Override] = {"m4": Override()}  # name: overrides of federation.*, attack.*


class Evaluation(Strict):
    n_way: PosInt = 5
    k_shot: PosInt = 5
    steps: Steps = 50  # fine-tuning steps at test time
    batch: PosInt = 10
    lr: LearningRate = 0.001  # η of test-time fine-tuning (paper: 0.001)
    bn_mode: Literal["support", "transductive", "support_plus_query"] = "support"
    target_output: Literal["last", "random"] = "last"  # where the target sits in attack-evaluation episodes
    head: Head = "shared"  # the classifier a user's fine-tuning starts from: θ's, zero, or support prototypes


class Defense(Strict):
    delta: Prob = 0.3  # θ' = δθ + (1 − δ)θ_g
    head_steps: NonNegInt = 10  # phase 1: train gates α and scales β with θ' fixed
    lr: LearningRate = 0.001


class Config(Strict):
    profile: str
    seed: NonNegInt
    threads: PosInt
    device: str
    dataset: Literal["omniglot", "miniimagenet"]
    omniglot: OmniglotData
    miniimagenet: MiniImageNetData
    datasets: dict[Literal["omniglot", "miniimagenet"], DatasetSpec]
    key: Key
    reptile: Reptile
    federation: Federation
    attack: Attack
    evaluation: Evaluation
    defense: Defense
    profiles: dict[str, Budget]
    experiment4: Experiment4 = Experiment4()

    @model_validator(mode="after")
    def _cross_field(self) -> Config:
        """Checks between keys, each message naming the key, its value and what is allowed."""
        try:
            check_device(self.device)
        except ValueError as exc:
            raise ValueError(f"device: {exc} (got {self.device!r})") from None
        fed = self.federation
        if fed.min_updates > fed.per_round:
            raise ValueError(
                f"federation.min_updates: {fed.min_updates} exceeds per_round = {fed.per_round}; "
                "allowed: min_updates <= per_round <= users - 1"
            )
        if fed.per_round > fed.users - 1:
            raise ValueError(
                f"federation.per_round: {fed.per_round} exceeds the users - 1 = {fed.users - 1} "
                "benign users a benign round picks from; "
                "allowed: min_updates <= per_round <= users - 1"
            )
        if fed.flower.root_certificates is not None and fed.flower.superlink is None:
            raise ValueError(
                "federation.flower.root_certificates: only a running SuperLink is reached over TLS; "
                "allowed: set with federation.flower.superlink, or null"
            )
        if fed.attacker >= fed.users:
            raise ValueError(
                f"federation.attacker: {fed.attacker} is not a user index; allowed: 0 to users - 1 = {fed.users - 1}"
            )
        problem = aggregation_problem(fed)
        if problem is not None:
            raise ValueError(problem)
        if self.profile not in self.profiles:
            raise ValueError(f"profile: unknown profile {self.profile!r}; allowed: one of {sorted(self.profiles)}")
        if self.dataset not in self.datasets:
            raise ValueError(
                f"dataset: {self.dataset!r} has no settings under datasets; allowed: one of {sorted(self.datasets)}"
            )
        spec = self.datasets[self.dataset]
        xb, xt = spec.ratio
        n_b = backdoor_shots(spec)
        if n_b == 0 or n_b == spec.train_shots:
            raise ValueError(
                f"datasets.{self.dataset}.ratio: {xb}:{xt} of {spec.train_shots} shots "
                f"leaves {'no X_B' if n_b == 0 else 'no X_T'} "
                f"in poisoned episodes; allowed: a ratio giving 1 to {spec.train_shots - 1} X_B shots"
            )
        if self.evaluation.n_way > self.reptile.n_way:
            raise ValueError(
                f"evaluation.n_way: {self.evaluation.n_way} exceeds the model's {self.reptile.n_way} outputs "
                "(reptile.n_way); "
                f"allowed: at most {self.reptile.n_way}"
            )
        examples = self.reptile.n_way * spec.train_shots
        if self.reptile.inner_batch > examples:  # a batch drawn across shuffled passes would repeat examples
            raise ValueError(
                f"reptile.inner_batch: {self.reptile.inner_batch} exceeds the {examples} examples of a "
                f"meta-training episode (reptile.n_way = {self.reptile.n_way} × datasets.{self.dataset}.train_shots = "
                f"{spec.train_shots}); allowed: at most {examples}"
            )
        support = self.evaluation.n_way * self.evaluation.k_shot
        if self.evaluation.batch > support:
            raise ValueError(
                f"evaluation.batch: {self.evaluation.batch} exceeds the {support} support examples of an "
                f"evaluation episode (evaluation.n_way = {self.evaluation.n_way} × evaluation.k_shot = "
                f"{self.evaluation.k_shot}); allowed: at most {support}"
            )
        side = self.omniglot.image_size if self.dataset == "omniglot" else self.miniimagenet.image_size
        if round(self.key.size * side) < MIN_KEY_SIDE:
            raise ValueError(
                f"key.size: {self.key.size} of a {side}-pixel {self.dataset}.image_size is "
                f"{round(self.key.size * side)} pixel{'' if round(self.key.size * side) == 1 else 's'}, "
                f"below the key's {MIN_KEY_SIDE}; "
                f"allowed: at least {math.ceil(1.5 / side * 10_000) / 10_000} "
                "(the key's side is round(key.size × image side) pixels)"
            )
        if self.evaluation.k_shot + 1 > spec.benign_examples:
            raise ValueError(
                f"evaluation.k_shot: {self.evaluation.k_shot} shots plus 1 query exceed "
                f"the target's datasets.{self.dataset}.benign_examples = "
                f"{spec.benign_examples}; allowed: at most {spec.benign_examples - 1}"
            )
        return self

    @property
    def budget(self) -> Budget:
        return self.profiles[self.profile]

    def continuation(self) -> Config:
        """These parameters as Experiment 1's benign rounds after the attack use them (`Budget.continuation`)."""
        profiles = {**self.profiles, self.profile: self.budget.continuation()}
        return self.model_copy(update={"profiles": profiles})

    @property
    def spec(self) -> DatasetSpec:
        return self.datasets[self.dataset]


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    if not first["loc"]:  # a cross-field check: its message already names the keys
        return f"params.yaml: {first['msg'].removeprefix('Value error, ')}"
    where = ".".join(str(p) for p in first["loc"])
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"params.yaml: {where}: {first['msg'].removeprefix('Value error, ')}{shown}"


def parse(raw: Any) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise FedmetaError(_format_error(err)) from None


def check_device(device: str) -> str:
    """'cpu', 'cuda' or 'cuda:N' naming a visible CUDA device; anything else (meta, mps, cuda:99 without it) is
    refused."""
    import torch

    allowed = "allowed: 'cpu', 'cuda' or 'cuda:N'"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"not a device name; {allowed}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device type {dev.type!r} is not supported; {allowed}")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ValueError(f"there is one CPU device; {allowed}")
    if dev.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0:
            raise ValueError("CUDA requested but no CUDA device is available; allowed: 'cpu'")
        if dev.index is not None and dev.index >= visible:
            raise ValueError(
                f"no such CUDA device ({visible} visible); allowed: 'cpu', 'cuda' or 'cuda:0' to 'cuda:{visible - 1}'"
            )
    return device


class _Refused(yaml.YAMLError):
    """A document the loader refuses by name: its message is the whole reason."""


def _check_expansion(root: yaml.Node) -> None:
    """Count the values `root` expands to, an alias counting as a copy of what it names, without expanding it."""
    sizes: dict[int, int] = {}
    entered: set[int] = set()
    todo: list[tuple[yaml.Node, bool]] = [(root, False)]
    while todo:  # post-order, iteratively: children's sizes before their parent's
        node, children_done = todo.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        else:
            kids = node.value if isinstance(node, yaml.SequenceNode) else []
        if not children_done:
            if id(node) in entered:  # reached again inside itself
                raise _Refused(f"an alias refers to itself (line {node.start_mark.line + 1}); allowed: no recursion")
            entered.add(id(node))
            todo.append((node, True))
            todo += [(k, False) for k in kids if id(k) not in sizes]
            continue
        sizes[id(node)] = 1 + sum(sizes[id(k)] for k in kids)
        if sizes[id(node)] > MAX_YAML_VALUES:
            raise _Refused(
                f"aliases expand to more than {MAX_YAML_VALUES} values (line {node.start_mark.line + 1}); "
                f"allowed: at most {MAX_YAML_VALUES} (params.yaml holds a few hundred)"
            )


class _DuplicateKey(_Refused):
    pass


MAX_YAML_DEPTH = 64  # params.yaml nests 5 levels; the composer recurses per level, so 3,000 would overflow the stack
MAX_YAML_VALUES = 100_000  # values after aliases expand; params.yaml holds a few hundred (an alias bomb: billions)


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated within one mapping (plain YAML keeps the last one silently),
    naming it by its dotted path, and a document nested deeper than MAX_YAML_DEPTH or expanding, through its
    aliases, to more than MAX_YAML_VALUES values: either would hang or crash the stage instead of failing."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise _Refused(
                    f"nested deeper than {MAX_YAML_DEPTH} levels (line {line}); allowed: at most {MAX_YAML_DEPTH}"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expansion(node)
        self._paths: dict[int, str] = {}
        todo: list[tuple[yaml.Node, str]] = [(node, "")]
        while todo:
            here, path = todo.pop()
            if id(here) in self._paths:  # an alias: already walked
                continue
            self._paths[id(here)] = path
            if isinstance(here, yaml.MappingNode):
                todo += [(v, f"{path}{k.value}." if isinstance(k, yaml.ScalarNode) else path) for k, v in here.value]
            elif isinstance(here, yaml.SequenceNode):
                todo += [(v, f"{path}{i}.") for i, v in enumerate(here.value)]
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    where = getattr(self, "_paths", {}).get(id(node), "")
                    raise _DuplicateKey(
                        f"{where}{key}: duplicate key (lines {seen[key]} and {line}); each key may appear once"
                    )
                seen[key] = line
            except TypeError:  # an unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep)


def load(path: Path = Path("params.yaml")) -> Config:
    if path.is_dir():
        raise FedmetaError(f"{path}: is a directory, not the parameters file")
    if not path.is_file():
        raise FedmetaError(f"{path}: parameters file not found (run from the repository root)")
    if path.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff"):  # what some Windows editors save as "Unicode"
        raise FedmetaError(f"{path}: saved as UTF-16; save it as UTF-8")
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except _Refused as exc:
        raise FedmetaError(f"{path}: {exc}") from None
    except RecursionError:  # a nest within MAX_YAML_DEPTH that still overflows a small stack
        raise FedmetaError(f"{path}: nested too deeply to read; allowed: at most {MAX_YAML_DEPTH} levels") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise FedmetaError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise FedmetaError(f"{path}: expected a mapping of parameters at the top level")
    return parse(raw)


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in changes.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_overrides(params: Config, federation: str, attack: dict[str, Any] | None = None, **changes: Any) -> Config:
    """The parameters of one Experiment-4 run: experiment4.federations.<federation>'s overrides, then
    `changes` to `federation` (e.g. aggregator=...) and `attack`, validated like params.yaml itself."""
    if federation not in params.experiment4.federations:
        raise FedmetaError(
            f"params.yaml: experiment4.federations: no federation {federation!r}; "
            f"allowed: one of {sorted(params.experiment4.federations)}"
        )
    o = params.experiment4.federations[federation]
    raw = params.model_dump(mode="json") | {"experiment4": {"federations": {}}}
    raw = _merge(raw, {"federation": _merge(o.federation, changes), "attack": _merge(o.attack, attack or {})})
    return parse(raw)


def check_experiment4(params: Config, federation: str, stage: str) -> None:
    """Experiment 4's own rules, checked by its stage `stage` only (the paper's stages never run them): `mean`, the
    baseline, among experiment4.aggregators, and every rule able to run on `federation`, listed or not, since
    `-S federation.aggregator=…` may pick any."""
    where = f"; this blocks Experiment 4's stage {stage} (experiment4/dvc.yaml)"
    aggregators = params.experiment4.aggregators
    if "mean" not in aggregators:
        raise FedmetaError(
            f"params.yaml: experiment4.aggregators: {aggregators} lacks mean, the baseline every rule is compared "
            f"with; allowed: a list holding mean{where}"
        )
    for agg in AGGREGATORS:
        try:
            with_overrides(params, federation, aggregator=agg, secure_aggregation=False)  # as Experiment 4 runs them
        except FedmetaError as err:
            if "experiment4.federations: no federation" in str(err):
                raise
            raise FedmetaError(
                f"params.yaml: experiment4.federations.{federation} with aggregator {agg}: "
                f"{str(err).removeprefix('params.yaml: ')}{where}"
            ) from None


def backdoor_shots(spec: DatasetSpec) -> int:
    """How many of the target's K shots are X_B in a poisoned episode (2:3 of 10 → 4)."""
    xb, xt = spec.ratio
    return round(spec.train_shots * xb / (xb + xt))
