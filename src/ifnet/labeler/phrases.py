"""Mention phrases for the 13 CheXpert findings (regular expressions over lowercased text).

Written for this project from chest-radiograph reporting language and tuned on the IU-Xray
*train* split against CheXbert labels (see docs/LABELER.md). Each observation has:

* ``mentions`` -- phrases that assert the finding (its code then comes from negation/uncertainty
  context: "no pleural effusion" is a negative mention of Pleural Effusion);
* ``normal``   -- phrases that state the structure is normal ("heart size is normal"); they give a
  NEGATIVE mention even without a negation word;
* ``exclude``  -- larger phrases inside which a mention does not count ("calcified granuloma"
  is not a Lung Lesion for CheXpert/CheXbert, "pleural thickening" is not a Lung Opacity).

Patterns are joined into one alternation per observation and per list; word boundaries are added
around each alternation, so patterns themselves do not need ``\\b``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

# Small vocabularies reused by several observations. Filler words may sit between a structure
# and its adjective ("heart is mildly enlarged") but cannot carry a second statement.
_DEGREE = (r"(?:mild|mildly|moderate|moderately|marked|markedly|severe|severely|slight|slightly|minimal|"
           r"minimally|significant|significantly|somewhat|borderline|stably|stable|again|now|still|"
           r"xxxx|at least|also|overall|diffusely|massively|massive|persistently|globally)")
_FILL = r"(?:\s+(?:" + _DEGREE + r"|is|are|was|were|appears?|seems?|remains?|size|in size|the|be|to be))*\s+"
_HEART = (r"(?:heart|cardiac silhouette|cardiac shadow|heart size|cardiac size|cardiac contours?|"
          r"cardiac silhouette size|cardiopericardial silhouette|cardiac (?:fluid|outline))")
_LARGE = r"(?:enlarged|enlargement|large|larger|increased|prominent|prominence|widened)"
_MEDIASTINUM = (r"(?:mediastinum|mediastinal (?:silhouette|contours?|shadow)|superior mediastinum|"
                r"mediastinal width)")
_NORMALLY = (r"(?:normal|within normal limits|unremarkable|not enlarged|nonenlarged|non-enlarged|"
             r"stable|unchanged|upper normal|normal limits|normal in size|grossly normal|"
             r"within the limits of normal|top normal|of normal size)")
_NORMAL_FILL = r"(?:\s+(?:is|are|appears?|remains?|size|in size|and contour|and contours|xxxx|again|stable|grossly))*\s+"


@dataclass(frozen=True)
class ObservationPhrases:
    """The phrase lists of one observation (see module docstring)."""

    mentions: Tuple[str, ...]
    normal: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = field(default=())


PHRASES: Dict[str, ObservationPhrases] = {
    "Enlarged Cardiomediastinum": ObservationPhrases(
        mentions=(
            _MEDIASTINUM + _FILL + _LARGE, r"(?:cardio ?)?mediastin(?:um|al) (?:\w+ ){0,3}?"
            r"(?:widening|widened|wide|enlarged|enlargement|prominence|prominent|fullness|abnormal|abnormality)",
            r"(?:abnormal|wide|widened|widening|prominence|prominent|enlarged|enlargement|fullness)"
            r"(?: of)?(?: the)?(?: \w+)?(?: superior| upper)? (?:cardio ?)?mediastin(?:um|al)",
            r"(?:mediastinal|hilar|paratracheal) (?:adenopathy|lymphadenopathy|mass|masses|fullness|"
            r"prominence|thickening|soft tissues?|widening|enlargement)",
            r"enlarged cardiomediastinal silhouette", r"(?:adenopathy|lymphadenopathy)",
            r"aneurysm", r"dextrocardia", r"(?:postsurgical|postoperative) changes (?:of|in) the mediastinum",
            r"mediastinal shift", r"thyroid (?:mass|goiter)", r"goiter",
        ),
        normal=(
            r"(?:cardio ?mediastinal|mediastinal|cardiac and mediastinal|heart and mediastinal) "
            r"(?:silhouettes?|contours?|shadows?|structures)" + _NORMAL_FILL + _NORMALLY,
            r"mediastinum" + _NORMAL_FILL + _NORMALLY, _NORMALLY + r" (?:cardio ?mediastinal|mediastinal) "
            r"(?:silhouette|contours?)", r"normal mediastinum",
        ),
    ),
    "Cardiomegaly": ObservationPhrases(
        mentions=(
            r"cardiomegaly", r"cardiac enlargement", r"cardiomyopathy",
            _HEART + _FILL + r"(?:enlarged|large|increased|prominent|borderline(?: enlarged| large)?)",
            r"(?:enlarged|large|prominent|borderline (?:enlarged|large))(?:\s+" + _DEGREE + r")?\s+"
            r"(?:heart|cardiac silhouette|cardiac shadow|cardiac contours?)",
            r"(?:increased|enlarged) (?:heart|cardiac) size", r"enlargement of the (?:heart|cardiac silhouette)",
            r"(?:borderline|mild) heart size", r"(?:atrial|ventricular) enlargement",
            r"(?:congestive )?(?:heart|cardiac) failure", r"chf",
        ),
        normal=(
            r"(?:heart|cardiac silhouette|heart size|cardiac size|cardiac contours?|cardiac shadow)"
            + _NORMAL_FILL + r"(?:normal|within normal limits|not (?:significantly |substantially |markedly )?enlarged|"
            r"unremarkable|normal in size|nonenlarged|non-enlarged)",
            r"normal (?:heart|cardiac)(?: size| silhouette| contours?)?",
            r"(?:heart|cardiac) size (?:is )?(?:within )?normal",
            # "heart size, mediastinal contour and vascularity are within normal limits"
            r"(?:heart|cardiac) (?:size|silhouette|contours?)(?:(?:,| and|, and) (?:the )?(?:\w+ ){0,2}\w+)+ "
            r"(?:is|are|appears?) (?:grossly )?(?:normal|within normal limits|unremarkable)",
            # "upper limits of normal" is still normal; CheXbert mostly agrees (tuned on train).
            r"(?:heart|cardiac)(?: silhouette)?(?: size)?(?: is| appears)?(?: at| near)?(?: the)? "
            r"(?:upper|top)(?: limits?)?(?: of)?[- ]normal", r"(?:upper|top)(?: limits?)?(?: of)?[- ]normal "
            r"(?:in size )?(?:heart|cardiac)(?: size)?",
        ),
    ),
    "Lung Opacity": ObservationPhrases(
        mentions=(
            r"opacity", r"opacities", r"opacification", r"opacified", r"infiltrates?", r"infiltration",
            r"(?:air ?space|alveolar|parenchymal) (?:disease|process)", r"haziness", r"hazy",
            r"ground[- ]glass", r"interstitial (?:markings|changes|pattern|lung disease|opacities)",
            r"reticular", r"reticulonodular", r"airspace", r"air space", r"scars?", r"scarring", r"scarred",
            r"bronchiectasis", r"interstitial (?:disease|lung changes?)", r"streak(?:y|iness)",
        ),
        exclude=(
            r"(?:bone|bony|osseous|soft tissue|breast|nipple|skin|calcified|vascular) (?:opacity|opacities)",
            r"pleural (?:scarring|scar|thickening)",
            r"nodular (?:opacity|opacities)", r"airspace consolidation", r"air space consolidation",
            r"retrosternal (?:air ?space|air space)", r"\d+(?:\.\d+)? ?(?:mm|cm) (?:\w+ ){0,3}(?:opacity|opacities)",
        ),
    ),
    "Lung Lesion": ObservationPhrases(
        mentions=(
            r"nodules?", r"nodular", r"masses", r"mass", r"lesions?", r"neoplasms?", r"neoplastic",
            r"tumou?rs?", r"carcinoma", r"cancer", r"malignancy", r"metastas[ie]s", r"metastatic",
            r"cavitary lesion", r"cavitation", r"lung (?:mass|lesion)",
            # A measured or rounded focal opacity is a lesion, not diffuse opacity.
            r"\d+(?:\.\d+)? ?(?:mm|cm|millimeters?|centimeters?) (?:\w+ ){0,3}(?:opacity|opacities|density|densities)",
            r"(?:round|rounded|ovoid|oval) (?:\w+ )?(?:opacity|opacities|density|densities)",
        ),
        exclude=(
            r"calcifi(?:ed|c) (?:\w+ ){0,3}(?:nodules?|granulomas?|lesions?|densit(?:y|ies)|opacit(?:y|ies))",
            r"(?:round|rounded|ovoid|oval) (?:calcifi\w+|sclerotic|bony|bone) (?:density|densities|opacity|opacities)",
            r"granulomatous (?:nodules?|disease)",
            r"(?:nodules?|lesions?) (?:\w+ ){0,3}(?:granulomas?|granulomatous)",
            r"nodular interstitial", r"metastatic disease to the bones?", r"bone metastas[ie]s",
            r"(?:soft tissue|breast|thyroid|mediastinal|adrenal|abdominal|bone|bony|lytic|sclerotic|osseous|"
            r"skin|liver|hepatic|renal|neck) (?:mass|masses|lesions?|nodules?)", r"body habitus",
            r"(?:lytic|sclerotic|blastic|bone|bony|osseous) (?:\w+ ){0,2}lesions?", r"mass effect",
        ),
    ),
    "Edema": ObservationPhrases(
        mentions=(
            r"edema", r"oedema", r"(?:vascular|venous|pulmonary) congestion", r"congestive (?:heart|cardiac) failure",
            r"(?:central |pulmonary |hilar )?vascular (?:prominence|congestive changes)", r"volume overload",
            r"chf", r"heart failure", r"fluid overload", r"kerley", r"vascular engorgement",
            r"venous engorgement", r"cephalization",
        ),
        exclude=(r"(?:soft tissue|laryngeal|subcutaneous|extremity|ankle|pedal) edema",),
    ),
    "Consolidation": ObservationPhrases(
        mentions=(r"consolidations?", r"consolidative", r"consolidated", r"air bronchograms?"),
    ),
    "Pneumonia": ObservationPhrases(
        mentions=(
            r"pneumonias?", r"pneumonitis", r"bronchopneumonia", r"infections?", r"infectious",
            r"infective", r"aspiration", r"pneumonic",
        ),
    ),
    "Atelectasis": ObservationPhrases(
        mentions=(
            r"atelectasis", r"atelectases", r"atelectatic", r"collapse", r"collapsed",
            r"(?:plate|disk|disc)[- ]?like", r"subsegmental", r"discoid",
        ),
        exclude=(r"(?:vertebral|vertebral body|compression) (?:\w+ )?collapse",),
    ),
    "Pneumothorax": ObservationPhrases(
        mentions=(r"pneumothora(?:x|ces|xes)", r"pleural air", r"(?:hydro|hemo|haemo)pneumothorax", r"ptx"),
    ),
    "Pleural Effusion": ObservationPhrases(
        mentions=(
            r"effusions?", r"pleural fluid", r"hydrothorax", r"hemothorax", r"hydropneumothorax",
            r"(?:costophrenic|cp) (?:angles?|sulci|sulcus|recess(?:es)?)? ?(?:\w+ )?(?:blunting|blunted)",
            r"blunting of the (?:\w+ ){0,4}(?:costophrenic|cp)", r"blunted (?:\w+ ){0,2}(?:costophrenic|cp)",
            r"fluid (?:in|within) the (?:\w+ )?fissure", r"layering fluid", r"fluid collection",
        ),
        exclude=(r"pericardial effusions?", r"joint effusions?"),
    ),
    "Pleural Other": ObservationPhrases(
        mentions=(
            r"pleural (?:thickening|plaques?|scarring|calcifications?|reaction|disease)", r"fibrothorax",
            r"pleural[- ]parenchymal (?:scarring|thickening)", r"pleuroparenchymal (?:scarring|thickening)",
            r"apical (?:pleural )?(?:capping|thickening)", r"thickening of the pleura",
            r"fibrosis",
        ),
    ),
    "Fracture": ObservationPhrases(
        mentions=(r"fractures?", r"fractured", r"fx"),
    ),
    "Support Devices": ObservationPhrases(
        mentions=(
            r"catheters?", r"picc", r"pic", r"lines?", r"tubes?", r"tubing", r"pacemakers?", r"pacer",
            r"aicd", r"icd", r"defibrillator", r"(?:pacer|pacemaker|pacing) (?:leads?|wires?)", r"leads?",
            r"port-a-cath", r"portacath", r"mediport", r"port", r"stents?", r"drains?",
            r"swan[- ]ganz", r"endotracheal", r"tracheostomy", r"ng tube", r"og tube", r"enteric",
            r"sheath", r"cannula", r"occluder", r"valve replacement", r"prosthetic valve", r"lvad",
        ),
        exclude=(
            r"(?:mid|lines? of|skin|fissure|pleural|azygoesophageal|paraspinal|paratracheal|septal|kerley|"
            r"linear|b|costophrenic|mediastinal|midclavicular|axillary) lines?",
            r"lines? (?:of|in) the (?:\w+ )?fissure", r"(?:bronchial|eustachian|fallopian) tubes?",
            r"main ?stem", r"lead(?:s)? to", r"line (?:of|with) (?:sight|the)",
        ),
    ),
}
