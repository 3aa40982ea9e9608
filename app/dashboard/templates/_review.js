// Label review (run page, example page): decisions need an API write token (the sign-in cookie only reads);
// kept for this tab only. Needs RUN, CLASSES and an afterReview() that redraws what shows decisions.
const TOKEN_KEY = `ivon-diag-review-${RUN}`;
let decisions = new Map();
async function loadReviews() {
  const r = await fetch(`/api/v1/runs/${RUN}/reviews`);
  if (!r.ok) return;
  const page = await r.json();
  decisions = new Map(page.items.map(i => [i.idx, i]));
  const c = page.counts;
  document.getElementById("review-summary").textContent = page.total ?
    `${page.total} reviewed: ${c.keep} kept, ${c.relabel} relabeled, ${c.drop} dropped` : "no decisions yet";
}
function reviewControls(it) {
  const box = document.createElement("div");
  box.className = "review";
  const done = decisions.get(it.idx);
  const badge = document.createElement("b");
  badge.textContent = done ? (done.decision === "relabel" ? `→ ${done.label}` : done.decision)
                           : it.unreviewed ?? "";
  box.append(badge);
  if (!sessionStorage.getItem(TOKEN_KEY)) return box;
  const act = (label, body) => {
    const b = document.createElement("button");
    b.textContent = label;
    b.onclick = e => { e.stopPropagation(); review(it.idx, body); };
    return b;
  };
  const pick = document.createElement("select");
  pick.append(new Option("relabel…", ""));
  for (let k = 0; k < CLASSES; k++) if (k !== it.label) pick.append(new Option(`to ${k}`, k));
  pick.onclick = e => e.stopPropagation();
  pick.onchange = () => pick.value !== "" && review(it.idx, {decision: "relabel", label: +pick.value});
  box.append(act("keep", {decision: "keep"}), act("drop", {decision: "drop"}), pick);
  return box;
}
async function review(idx, body) {
  const r = await fetch(`/api/v1/runs/${RUN}/examples/${idx}/review`, {method: "PUT", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json", Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY)}`}});
  const err = document.getElementById("review-error");
  err.textContent = r.ok ? "" : r.status === 401 || r.status === 403 ? "the token was refused (it needs writes)"
                                 : `not saved: ${(await r.json()).detail?.[0]?.msg ?? r.status}`;
  if (r.status === 401 || r.status === 403) sessionStorage.removeItem(TOKEN_KEY);
  await loadReviews();
  await afterReview();
}
document.getElementById("review-start").onclick = async () => {
  const token = document.getElementById("review-token").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  document.getElementById("review-token").value = "";
  await afterReview();
};
