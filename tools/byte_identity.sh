#!/usr/bin/env bash
# Byte-identity check for refactors ("outputs unchanged by the move"): runs phantom -> train -> synthesize ->
# enlarge (ellipsoid, copy-paste, diffusion masks, multi-class) with the code of REPO, and writes one SHA-256 per
# output file to OUT/hashes.txt (checkpoints: of their weights; JSON files with OUT replaced by the word OUT).
# Compare two checkouts:  tools/byte_identity.sh OLD_CLONE /tmp/a; tools/byte_identity.sh . /tmp/b;
#                         diff <(sed 's#/tmp/b#OUT#' /tmp/b/hashes.txt) /tmp/a/hashes.txt
# usage: tools/byte_identity.sh REPO OUT   (about a minute on 2 CPU cores)
# usage: run.sh REPO OUTDIR  -- runs the pipeline with REPO's code and writes hashes to OUTDIR/hashes.txt
set -euo pipefail
REPO=$1; OUT=$2
rm -rf "$OUT"; mkdir -p "$OUT"
export PYTHONPATH=$REPO OMP_NUM_THREADS=1
export nnUNet_raw=$OUT/raw nnUNet_preprocessed=$OUT/pre nnUNet_results=$OUT/res
cd "$OUT"
python -m lefusion_nnunet.cli.main phantom --cases 6 --shape 48 48 24 --seed 3 > log.txt 2>&1
python -m lefusion_nnunet.cli.main phantom --kind cardiac --cases 4 --shape 48 48 12 --seed 3 >> log.txt 2>&1
python -m lefusion_nnunet.cli.main train -d 501 --lesion-label 2 --region-label 1 --preset tiny --roi-size 16 16 8 --steps 6 --batch-size 2 --checkpoint-every 3 -o $OUT/ckpt >> log.txt 2>&1
CK=$OUT/ckpt/checkpoint_final.pt
python -m lefusion_nnunet.cli.main enlarge -d 501 -o 502 --per-case 1 --region-label 1 --size-mm 4 8 --checkpoint $CK >> log.txt 2>&1
python -m lefusion_nnunet.cli.main enlarge -d 501 -o 503 --per-case 1 --method copy-paste --lesion-label 2 --mask-source real --region-label 1 >> log.txt 2>&1 || echo "copy-paste failed" >> log.txt
python - <<'PY'
import SimpleITK as sitk, glob, numpy as np
from scipy import ndimage
for f in sorted(glob.glob("raw/Dataset501_*/labelsTr/*.nii.gz")):
    im = sitk.ReadImage(f); a = sitk.GetArrayFromImage(im)
    lab, n = ndimage.label(a == 2)
    if n:
        sizes = ndimage.sum(np.ones_like(a), lab, range(1, n + 1)); k = int(np.argmin(sizes)) + 1
        m = sitk.GetImageFromArray((lab == k).astype(np.uint8)); m.CopyInformation(im); sitk.WriteImage(m, "mask.nii.gz")
        open("case.txt", "w").write(f.split("/")[-1][:-7]); break
PY
CID=$(cat case.txt)
python -m lefusion_nnunet.cli.main synthesize --checkpoint $CK -i raw/Dataset501_*/imagesTr/${CID}_0000.nii.gz -l raw/Dataset501_*/labelsTr/$CID.nii.gz --mask mask.nii.gz -o $OUT/synth --texture cluster:0 >> log.txt 2>&1 || echo "synth failed" >> log.txt
python -m lefusion_nnunet.cli.main train -d 511 --lesion-label 3 4 --preset tiny --roi-size 16 16 8 --steps 4 --batch-size 2 -o $OUT/ckpt_mc >> log.txt 2>&1
python -m lefusion_nnunet.cli.main enlarge -d 511 -o 512 --per-case 1 --region-label 2 --size-mm 4 8 --checkpoint $OUT/ckpt_mc/checkpoint_final.pt >> log.txt 2>&1 || echo "mc enlarge failed" >> log.txt
python -m lefusion_nnunet.cli.main train-mask -d 501 --lesion-label 2 --preset tiny --steps 4 --batch-size 2 -o $OUT/mask_ckpt >> log.txt 2>&1 || echo "train-mask failed" >> log.txt
python -m lefusion_nnunet.cli.main enlarge -d 501 -o 504 --per-case 1 --region-label 1 --size-mm 4 8 --checkpoint $CK --mask-source diffusion --mask-checkpoint $OUT/mask_ckpt/checkpoint_final.pt >> log.txt 2>&1 || echo "diffmask enlarge failed" >> log.txt
python - "$OUT" > "$OUT/hashes.txt" <<'PY'
import hashlib, os, sys, torch
root = os.path.abspath(sys.argv[1])
for dp, dn, fn in sorted(os.walk(root)):
    dn.sort()
    for f in sorted(fn):
        p = os.path.join(dp, f); rel = os.path.relpath(p, root)
        if rel in ("hashes.txt", "log.txt") or rel.endswith((".jsonl", ".png", ".log")):
            continue
        if rel.endswith(".pt"):
            c = torch.load(p, weights_only=True)
            st = c.get("ema_state") or c.get("model_state") or {}
            h = hashlib.sha256(b"".join(v.numpy().tobytes() for k, v in sorted(st.items()))).hexdigest()
            print(rel, "weights", h); continue
        data = open(p, "rb").read()
        if rel.endswith(".json"): data = data.replace(root.encode(), b"OUT")
        print(rel, hashlib.sha256(data).hexdigest())
PY
