"""The export's last step: load the written folder the way a server would and compare with the engine.

Two comparisons, on a handful of texts (a few short ones, and one per length limit that tokenizes
past it, so truncation is exercised):
- served vs engine: every way a server loads the folder, against the engine rebuilt from the same
  folder (engine.api, ember_task.json), both computing in float32 from the same weights, whatever
  export.dtype is. Strict: cosine >= 0.99999 (and norms within 1e-4), scores within 1e-4 (relative
  above 1). It catches what serving reads differently from the engine: pooling, normalisation,
  prompts and templates, EOS and BOS, the head, truncation.
   embedding: SentenceTransformer(folder) with the exported prompts; transformers AutoModel with the
     pooling, normalisation, prompts and length the folder records for servers (1_Pooling/,
     modules.json, config_sentence_transformers.json, sentence_bert_config.json); for each
     task.matryoshka_dims d, SentenceTransformer with truncate_dim=d against the engine's d-dim vectors;
   reranker: *ForCausalLM, logit(yes) - logit(no) at the last token, or *ForSequenceClassification;
   PEFT adapter folder (export.merge_lora=false): the base model + adapter through peft, compared
     with the trained model directly (the engine does not load adapter folders).
- engine vs trained: the engine rebuilt from the folder against the trained model as it was handed to
  the export (before LoRA is merged). Strict when both are float32; with bf16/fp16 on either side a
  tolerance per dtype (TOLERANCES) that rounding passes and wrong weights do not.

sentence-transformers (and the servers that read its files) cut queries and documents at one length,
max(data.query_max_len, data.doc_max_len); a text the engine cuts at a shorter limit of its own is
left out of that comparison (docs/serving.md). How each server loads and runs the folder is in
engine/served.py; this file holds the references, the comparisons and their tolerances.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.served import (ExportParityError, adapter_base, auto_model_vectors, recipe_from_sentence_transformers_files,
                           recipe_from_task_file, sentence_transformer_vectors, served_scores, with_adapter,
                           with_score_head)

QUERIES = ["what is a magnet?", "item 3 colour"]
DOCUMENTS = ["Magnets pull iron.", "item 3 is green", "ok"]
PAIRS = [(QUERIES[0], DOCUMENTS[0]), (QUERIES[0], DOCUMENTS[2]), (QUERIES[1], DOCUMENTS[1])]
# Repeated until the text tokenizes past the longest configured length.
LONG_UNIT = "Long passages check that serving cuts text where the engine does. "


@dataclasses.dataclass(frozen=True)
class Tolerance:
    cosine: float  # least cosine between two vectors
    relative: float  # largest |a - b| / max(1, |b|) for scores, |norm a / norm b - 1| for vectors


STRICT = Tolerance(0.99999, 1e-4)
# engine vs trained with bf16/fp16 weights or compute on either side: rounding (bf16 keeps about 3
# significant digits, and a deep model compounds it) moves vectors and scores by less; a wrong
# layer, an unmerged adapter or a missing head moves them by about their own size.
TOLERANCES = {torch.float32: STRICT, torch.float16: Tolerance(0.999, 0.02), torch.bfloat16: Tolerance(0.99, 0.1)}


@dataclasses.dataclass
class Reference:
    """The trained model's outputs on the parity texts, taken before the export writes anything."""

    texts: dict[str, list]  # side ("query", "document" or "pair") -> texts, (query, document) for pairs
    outputs: dict[str, Tensor]  # side -> (n, hidden) vectors or (n,) scores
    tokens: dict[str, list[list[int]]]  # side -> the engine's token ids of each text
    dtype: torch.dtype  # the trained weights' dtype
    device: torch.device


def parity_texts(tokenizer, cfg) -> dict[str, list]:
    """A few short texts per side, and one that tokenizes past that side's length limit."""
    if cfg.task.type == "reranker":
        return {"pair": PAIRS + [(QUERIES[1], _long_text(tokenizer, cfg.data.max_len))]}
    return {"query": QUERIES + [_long_text(tokenizer, cfg.data.query_max_len)],
            "document": DOCUMENTS + [_long_text(tokenizer, cfg.data.doc_max_len)]}


def _long_text(tokenizer, tokens: int) -> str:
    unit = max(1, len(tokenizer(LONG_UNIT, add_special_tokens=False)["input_ids"]))
    return LONG_UNIT * (tokens // unit + 2)


def engine_outputs(task, text_encoder, texts: dict[str, list], device) -> tuple[dict, dict]:
    """(outputs, token ids) per side, as engine.Embedder.encode / Reranker.score compute them."""
    from engine.inference import encode_tokens

    outputs, tokens = {}, {}
    for side, items in texts.items():
        if side == "pair":
            ids = text_encoder.pairs([q for q, _ in items], [d for _, d in items])
        elif side == "query":
            ids = text_encoder.queries(items)
        else:
            ids = text_encoder.documents(items)
        outputs[side] = encode_tokens(task, ids, len(ids), torch.device(device)).float().cpu()
        tokens[side] = ids
    return outputs, tokens


def trained_reference(task, cfg, tokenizer) -> Reference:
    """The in-memory model's outputs (its device, its dtype) on the parity texts."""
    from engine.data.tokenize import TextEncoder

    weight = task.backbone.model.embed_tokens.weight
    texts = parity_texts(tokenizer, cfg)
    encoder = TextEncoder(tokenizer, cfg.task, cfg.data, warn=lambda message: None)
    outputs, tokens = engine_outputs(task, encoder, texts, weight.device)
    return Reference(texts, outputs, tokens, weight.dtype, weight.device)


def check_export(folder: str, cfg, reference: Reference) -> dict:
    """Every served path of `folder` against the engine; the report for ember_parity.json, or
    ExportParityError naming the first difference (one line)."""
    started = time.perf_counter()
    checker = _Checker(folder, cfg, reference)
    try:
        with _quiet_loading():
            checker.run()
    except torch.cuda.OutOfMemoryError:
        raise ExportParityError(
            f"export parity: out of GPU memory loading {folder} next to the trained model; run "
            "launch/export.py on the last checkpoint instead (a fresh process)") from None
    return {"passed": True, "device": str(reference.device), "export_dtype": cfg.export.dtype,
            "comparisons": checker.done, "seconds": round(time.perf_counter() - started, 3)}


ENGINE = "the engine loaded from the export"
PEFT = "peft (base + adapter)"
SENTENCE_TRANSFORMERS = "sentence-transformers"
AUTO_MODEL = "transformers AutoModel"
TRAINED = "the trained model's"


class _Checker:
    def __init__(self, folder: str, cfg, reference: Reference):
        self.folder, self.cfg, self.ref = folder, cfg, reference
        self.task = cfg.task
        self.device = reference.device
        self.done: list[dict] = []

    def run(self) -> None:
        if os.path.isfile(os.path.join(self.folder, "adapter_config.json")):
            self._check_adapter()
        elif self.task.type == "embedding":
            self._check_embedder()
        else:
            self._check_reranker()

    # ---- merged folders: the engine loaded from the folder is the reference -----------------------

    def _check_embedder(self) -> None:
        engine = self._engine_from_folder()
        sides = self._sentence_transformers_sides()
        texts = {side: [self.ref.texts[side][i] for i in keep] for side, keep in sides.items()}
        dims = list(self.task.matryoshka_dims)
        vectors = _served(SENTENCE_TRANSFORMERS,
                          lambda: sentence_transformer_vectors(self.folder, texts, self.device, dims))
        recipe = _served("the sentence-transformers files",
                         lambda: recipe_from_sentence_transformers_files(self.folder))
        auto = _served(AUTO_MODEL, lambda: auto_model_vectors(self.folder, recipe, texts, self.device))
        st_hint = (f"check pooling (exported: {recipe.pooling}), normalize (exported: {recipe.normalize}), the "
                   "prompts in config_sentence_transformers.json and the tokenizer's EOS")
        auto_hint = (f"check pooling (recorded in 1_Pooling/config.json: {recipe.pooling}), normalisation "
                     f"(recorded: {recipe.normalize}), the prompts and the tokenizer's EOS")
        if not self.cfg.model.causal:
            # transformers 5 reads config.json's is_causal=false as bidirectional attention; older ones do not.
            st_hint = auto_hint = "model.causal=false: check that transformers honours config.json's is_causal=false"
        for side, keep in sides.items():
            want = engine[side][keep]
            self._vectors(SENTENCE_TRANSFORMERS, side, vectors[side], want, keep, STRICT, st_hint)
            self._vectors(AUTO_MODEL, side, auto[side], want, keep, STRICT, auto_hint)
            for dim in dims:
                # sentence-transformers cuts without renormalising; cosine does not see the difference.
                self._vectors(f"{SENTENCE_TRANSFORMERS} (truncate_dim={dim})", side, vectors[(side, dim)],
                              _prefix(want, dim, self.task.normalize), keep, STRICT,
                              f"check task.matryoshka_dims={dims}", norms=False)

    def _check_reranker(self) -> None:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        engine = self._engine_from_folder()
        auto_class = AutoModelForCausalLM if self.task.head == "yes_no" else AutoModelForSequenceClassification
        name = "transformers " + auto_class.__name__.replace("Auto", "*")
        scores = _served(name, lambda: self._pair_scores(
            lambda: auto_class.from_pretrained(self.folder, dtype=torch.float32)))
        self._scores(name, scores, engine["pair"], STRICT, self._head_hint())

    def _engine_from_folder(self) -> dict[str, Tensor]:
        """The engine rebuilt from the folder in float32; checked first against the trained model."""
        from engine.api import Embedder, Reranker

        def run():
            loader = Embedder if self.task.type == "embedding" else Reranker
            built = loader.from_pretrained(self.folder, device=str(self.device), dtype=torch.float32)
            return engine_outputs(built.task, built.text_encoder, self.ref.texts, self.device)

        outputs, tokens = _served("the engine (engine.api)", run)
        tolerance = _tolerance(self.ref.dtype, self.cfg.export.dtype)
        hint = ("the written weights, tokenizer or ember_task.json do not rebuild the trained model "
                f"(trained with {self._settings()})")
        for side, want in self.ref.outputs.items():
            differ = [i for i, (a, b) in enumerate(zip(tokens[side], self.ref.tokens[side])) if a != b]
            if differ:
                self._fail(f"the exported tokenizer gives other token ids than the trained one on "
                           f"{self._label(side, differ[0])}", hint)
            if side == "pair":
                self._scores(ENGINE, outputs[side], want, tolerance, hint, against=TRAINED)
            else:
                self._vectors(ENGINE, side, outputs[side], want, list(range(len(want))), tolerance, hint,
                              against=TRAINED)
        return outputs

    def _sentence_transformers_sides(self) -> dict[str, list[int]]:
        """Per side, the texts that sentence-transformers' one max_seq_length cuts where the engine does."""
        from engine.build import load_tokenizer
        from engine.config import ModelConfig
        from engine.data.tokenize import TextEncoder

        limit = max(self.cfg.data.query_max_len, self.cfg.data.doc_max_len)
        data = dataclasses.replace(self.cfg.data, query_max_len=limit, doc_max_len=limit)
        tokenizer = load_tokenizer(ModelConfig(path=self.folder))
        one_length = TextEncoder(tokenizer, self.task, data, warn=lambda message: None)
        sides = {}
        for side in ("query", "document"):
            texts = self.ref.texts[side]
            ids = one_length.queries(texts) if side == "query" else one_length.documents(texts)
            keep = [i for i, seq in enumerate(ids) if seq == self.ref.tokens[side][i]]
            if keep:
                sides[side] = keep
        return sides

    def _pair_scores(self, load) -> Tensor:
        return served_scores(load, self.folder, self.task, self.cfg.data.max_len, self.ref.texts["pair"],
                              self.device)

    # ---- PEFT adapter folders: base + adapter through peft, against the trained model -------------

    def _check_adapter(self) -> None:
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

        base = adapter_base(self.folder)
        tolerance = _tolerance(self.ref.dtype, "float32")  # the adapter keeps the trained dtype
        if self.task.type == "embedding":
            recipe = recipe_from_task_file(self.folder)
            vectors = _served(PEFT, lambda: auto_model_vectors(
                self.folder, recipe, self.ref.texts, self.device, load=lambda: with_adapter(AutoModel, base,
                                                                                             self.folder)))
            hint = f"check the adapter and the base model {base} ({self._settings()})"
            for side, want in self.ref.outputs.items():
                self._vectors(PEFT, side, vectors[side], want, list(range(len(want))), tolerance, hint,
                              against=TRAINED)
            return
        if self.task.head == "yes_no":
            scores = _served(PEFT, lambda: self._pair_scores(
                lambda: with_adapter(AutoModelForCausalLM, base, self.folder)))
        else:
            # Saved for a causal LM, the adapter's keys fit any model whose backbone is under `model.`:
            # on a sequence classifier it goes through the plain PeftModel (task_type None).
            scores = _served(PEFT, lambda: self._pair_scores(lambda: with_score_head(
                with_adapter(AutoModelForSequenceClassification, base, self.folder, task_type=None, num_labels=1),
                self.folder)))
        self._scores(PEFT, scores, self.ref.outputs["pair"], tolerance,
                     f"check the adapter and the base model {base}; {self._head_hint()}", against=TRAINED)

    # ---- comparisons ------------------------------------------------------------------------------

    def _vectors(self, served: str, side: str, got: Tensor, want: Tensor, keep: list[int], tol: Tolerance,
                 hint: str, against: str = "the engine's", norms: bool = True) -> None:
        what = f"{_owner(served)} {side} vectors"
        if got.shape != want.shape:
            self._fail(f"{what} have shape {tuple(got.shape)}, {against} {tuple(want.shape)}", hint)
        cosine = F.cosine_similarity(got.double(), want.double(), dim=-1)
        worst = int(cosine.argmin())
        if cosine[worst] < tol.cosine:
            self._fail(f"{what} differ from {against} (cosine {float(cosine[worst]):.6f} < {tol.cosine} on "
                       f"{self._label(side, keep[worst])})", hint)
        # Cosine misses scale: a server that normalises what the engine leaves unnormalised.
        ratio = (got.double().norm(dim=-1) / want.double().norm(dim=-1) - 1).abs()
        far = int(ratio.argmax())
        if norms and ratio[far] > tol.relative:
            self._fail(f"{what} have other lengths than {against} (norm {float(got[far].norm()):.6g} vs "
                       f"{float(want[far].norm()):.6g} on {self._label(side, keep[far])})", hint)
        self._record(served, against, f"{side} vectors", len(keep), least_cosine=round(float(cosine.min()), 8))

    def _scores(self, served: str, got: Tensor, want: Tensor, tol: Tolerance, hint: str,
                against: str = "the engine's") -> None:
        gap = (got.double() - want.double()).abs() / want.double().abs().clamp(min=1)
        worst = int(gap.argmax())
        if gap[worst] > tol.relative:
            self._fail(f"{_owner(served)} scores differ from {against} ({float(got[worst]):.6g} vs "
                       f"{float(want[worst]):.6g} on {self._label('pair', worst)}, more than {tol.relative:g})", hint)
        self._record(served, against, "scores", len(want), largest_gap=float(gap.max()))

    def _record(self, served: str, against: str, what: str, texts: int, **measure) -> None:
        against = "trained model" if against == TRAINED else "engine"
        self.done.append({"served": served, "against": against, "what": what, "texts": texts, **measure})

    def _fail(self, what: str, hint: str) -> None:
        raise ExportParityError(f"export parity: {what}: {hint}")

    def _label(self, side: str, index: int) -> str:
        length = len(self.ref.tokens[side][index])
        return f"{side} {index + 1} of {len(self.ref.tokens[side])}, {length} tokens"

    def _settings(self) -> str:
        t = self.task
        if t.type == "embedding":
            return f"pooling {t.pooling}, normalize {t.normalize}, append_eos {t.append_eos}"
        yes_no = f" ({t.yes_token!r} vs {t.no_token!r})" if t.head == "yes_no" else ""
        return f"head {t.head}{yes_no}, template {t.template!r}"

    def _head_hint(self) -> str:
        t = self.task
        if t.head == "yes_no":
            return f"check the yes/no tokens ({t.yes_token!r}, {t.no_token!r}), the template ({t.template!r}) and BOS"
        return f"check score.weight, the template ({t.template!r}) and BOS"


# ---- small helpers --------------------------------------------------------------------------------

def _owner(name: str) -> str:
    return f"{name}'" if name.endswith("s") else f"{name}'s"


def _prefix(vectors: Tensor, dim: int, normalize: bool) -> Tensor:
    from engine.model.pooling import vector_prefix

    return vector_prefix(vectors, dim, normalize)


def _tolerance(trained: torch.dtype, export_dtype: str) -> Tolerance:
    """The looser of the two precisions' tolerances."""
    from engine.build import DTYPES

    candidates = [TOLERANCES.get(trained, STRICT), TOLERANCES[DTYPES[export_dtype]]]
    return min(candidates, key=lambda t: t.cosine)


def _served(name: str, make):
    """make()'s result; a folder that `name` cannot load at all fails the check as a difference does
    (one line). On a GPU the model it loaded is freed before the next one loads: two copies of a big
    model may not fit. Not on the CPU: a full collection costs seconds in a process holding many
    objects (a test session), and the collector's own pace is enough there."""
    try:
        return make()
    except ImportError as err:
        raise ExportParityError(f"export parity: {name} is needed to check the export and is not installed "
                                f"({err}); pip install sentence-transformers peft") from None
    except torch.cuda.OutOfMemoryError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        if isinstance(err, ExportParityError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportParityError(f"export parity: {name} cannot load or run the export: {first}") from None
    finally:
        if torch.cuda.is_available() and torch.cuda.memory_allocated() > 0:
            gc.collect()
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _quiet_loading():
    """transformers' load reports (e.g. a sequence classifier's head "newly initialized" before the
    adapter's head is loaded in) are not the check's findings: the comparisons are."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()
