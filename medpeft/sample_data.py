"""The bundled sample dataset: SYNTHETIC, written by the medpeft authors, NOT MEDICAL ADVICE.

Built from a table of short textbook facts (first-line treatments, mechanisms, diagnostic tests, causes).
Each fact gets four question phrasings and two multiple-choice items whose distractors are other facts'
answers of the same kind. The `split` column places them so that evaluation can show learning:

    seen facts (4 of 5):  phrasings 1-2 -> train, phrasing 3 + one multiple-choice item -> validation,
                          phrasing 4 + the other multiple-choice item -> test
    unseen facts (1 of 5): everything -> test

One record:  {"question": "How does warfarin work?", "answer": "Inhibiting vitamin K epoxide reductase, ...",
              "options": null, "label": null, "fact_id": "mechanism-06", "kind": "mechanism",
              "split": "train", "seen": true, "source": "medpeft synthetic sample; not medical advice"}

Regenerate the shipped file with `python -m medpeft.sample_data`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SAMPLE_PATH = Path(__file__).parent / "resources" / "medical_sample.jsonl"
SOURCE = "medpeft synthetic sample; not medical advice"

FACTS = {
    "treatment": [
        ("uncomplicated type 2 diabetes", "metformin"),
        ("anaphylaxis", "intramuscular epinephrine (adrenaline)"),
        ("streptococcal pharyngitis", "penicillin V or amoxicillin"),
        ("primary hypothyroidism", "levothyroxine"),
        ("childhood absence seizures", "ethosuximide"),
        ("syphilis", "benzathine penicillin G"),
        ("status epilepticus", "an intravenous benzodiazepine such as lorazepam"),
        ("uncomplicated cystitis in women", "nitrofurantoin"),
        ("major depressive disorder", "a selective serotonin reuptake inhibitor (SSRI)"),
        ("early Lyme disease", "doxycycline"),
        ("opioid overdose", "naloxone"),
        ("malignant hyperthermia", "dantrolene"),
        ("trigeminal neuralgia", "carbamazepine"),
        ("paracetamol (acetaminophen) overdose", "N-acetylcysteine"),
        ("scabies", "topical permethrin"),
        ("Pneumocystis pneumonia", "trimethoprim-sulfamethoxazole"),
        ("Parkinson disease motor symptoms", "levodopa combined with carbidopa"),
        ("hyperkalemia with ECG changes", "intravenous calcium gluconate"),
        ("Wilson disease", "a copper chelator such as penicillamine"),
        ("acute angle-closure glaucoma", "topical and systemic agents to lower eye pressure, then laser iridotomy"),
    ],
    "mechanism": [
        ("metformin", "decreasing glucose production by the liver"),
        ("omeprazole", "irreversibly blocking the proton pump (H+/K+ ATPase) of gastric parietal cells"),
        ("aspirin", "irreversibly inhibiting cyclooxygenase, which lowers platelet thromboxane A2"),
        ("atorvastatin", "inhibiting HMG-CoA reductase, the key enzyme of cholesterol synthesis"),
        ("lisinopril", "inhibiting angiotensin-converting enzyme (ACE)"),
        ("warfarin", "inhibiting vitamin K epoxide reductase, reducing vitamin K-dependent clotting factors"),
        ("furosemide", "blocking the Na-K-2Cl cotransporter in the thick ascending limb of the loop of Henle"),
        ("penicillin", "binding penicillin-binding proteins and blocking bacterial cell wall synthesis"),
        ("losartan", "blocking the angiotensin II type 1 receptor"),
        ("allopurinol", "inhibiting xanthine oxidase, which lowers uric acid production"),
        ("clopidogrel", "irreversibly blocking the P2Y12 ADP receptor on platelets"),
        ("heparin", "activating antithrombin, which inactivates thrombin and factor Xa"),
        ("ondansetron", "blocking serotonin 5-HT3 receptors"),
        ("sildenafil", "inhibiting phosphodiesterase type 5"),
        ("levothyroxine", "replacing thyroxine (T4), which the body converts to active T3"),
    ],
    "test": [
        ("diabetes mellitus", "a hemoglobin A1c (HbA1c) test, with 6.5% or higher diagnostic"),
        ("pulmonary embolism", "CT pulmonary angiography"),
        ("celiac disease", "tissue transglutaminase IgA antibodies, confirmed by duodenal biopsy"),
        ("cystic fibrosis", "a sweat chloride test"),
        ("acute myocardial infarction", "a rise in cardiac troponin with ECG changes"),
        ("deep vein thrombosis", "compression ultrasonography of the leg veins"),
        ("myasthenia gravis", "acetylcholine receptor antibodies"),
        ("hereditary hemochromatosis", "transferrin saturation and serum ferritin, then HFE gene testing"),
        ("giant cell arteritis", "a temporal artery biopsy"),
        ("multiple sclerosis", "MRI of the brain and spinal cord showing lesions disseminated in time and space"),
        ("pheochromocytoma", "plasma free metanephrines"),
        ("latent tuberculosis", "an interferon-gamma release assay or a tuberculin skin test"),
    ],
    "cause": [
        ("tuberculosis", "the bacterium Mycobacterium tuberculosis"),
        ("Lyme disease", "the bacterium Borrelia burgdorferi, transmitted by Ixodes ticks"),
        ("scurvy", "vitamin C deficiency"),
        ("pernicious anemia", "autoimmune loss of intrinsic factor, leading to vitamin B12 deficiency"),
        ("sickle cell disease", "a point mutation in the beta-globin gene (HBB)"),
        ("cholera", "the bacterium Vibrio cholerae"),
        ("Wernicke encephalopathy", "thiamine (vitamin B1) deficiency"),
        ("Graves disease", "autoantibodies that stimulate the TSH receptor"),
        ("rickets", "vitamin D deficiency"),
        ("malaria", "Plasmodium parasites transmitted by Anopheles mosquitoes"),
        ("shingles", "reactivation of the varicella-zoster virus"),
        ("Addison disease", "autoimmune destruction of the adrenal cortex"),
    ],
}

QUESTIONS = {
    "treatment": ["What is the first-line treatment for {s}?", "Which treatment is usually tried first for {s}?",
                  "How is {s} treated initially?", "What do guidelines recommend first for {s}?"],
    "mechanism": ["How does {s} work?", "What is the mechanism of action of {s}?",
                  "By what mechanism does {s} act?", "Explain how {s} produces its effect."],
    "test": ["Which test is used to diagnose {s}?", "How is {s} diagnosed?",
             "What investigation confirms {s}?", "What is the standard diagnostic test for {s}?"],
    "cause": ["What causes {s}?", "What is the cause of {s}?", "What is {s} caused by?",
              "What is the underlying cause of {s}?"],
}
# Short answers: the fact itself, in the same words as the multiple-choice option that names it, so that the
# few steps a CPU demo can afford go into the fact rather than into a sentence template.
ANSWER = "{A}."
MC_QUESTIONS = {
    "treatment": ["Which of the following is the first-line treatment for {s}?",
                  "A patient has {s}. Which treatment should be tried first?"],
    "mechanism": ["Which of the following describes how {s} works?",
                  "What is the mechanism of action of {s}? Choose one."],
    "test": ["Which of the following is used to diagnose {s}?",
             "A clinician suspects {s}. Which test confirms it?"],
    "cause": ["Which of the following causes {s}?", "What is the cause of {s}? Choose one."],
}


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def build(seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for kind, facts in FACTS.items():
        for n, (subject, answer) in enumerate(facts):
            fact_id = f"{kind}-{n + 1:02d}"
            seen = n % 5 != 4
            base = {"fact_id": fact_id, "kind": kind, "seen": seen, "source": SOURCE}
            qa_splits = ["train", "train", "validation", "test"] if seen else ["test"] * 4
            for phrasing, split in zip(QUESTIONS[kind], qa_splits):
                rows.append({"question": phrasing.format(s=subject),
                             "answer": ANSWER.format(A=_cap(answer)),
                             "options": None, "label": None, "split": split, **base})
            others = [a for j, (_, a) in enumerate(facts) if j != n]
            for phrasing, split in zip(MC_QUESTIONS[kind], ["validation" if seen else "test", "test"]):
                options = rng.sample(others, 3) + [answer]
                rng.shuffle(options)
                letter = "ABCD"[options.index(answer)]
                rows.append({"question": phrasing.format(s=subject), "answer": letter,
                             "options": {k: _cap(v) for k, v in zip("ABCD", options)}, "label": letter,
                             "split": split, **base})
    return rows


def write(path: Path = SAMPLE_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in build():
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


if __name__ == "__main__":
    print(f"wrote {write()}")
