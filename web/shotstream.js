// ShotStream web extension (small on purpose).
//  * ?load=<workflow> in the page address loads one of the pack's workflows (served by the pack at
//    /shotstream/workflows/<name>.json) or any same-server URL starting with "/". Tests and docs use it:
//    http://127.0.0.1:8188/?load=story_3shot_starter.json
//  * Story State nodes show their summary text after they run; Next Shot and the loader their notes, if any.
//  * The size widgets of Next Shot and Shot From Images are greyed out while a story state is connected:
//    the story's own size wins then, and a widget that cannot be edited cannot re-run a shot for nothing.
//  * A new Shot Prompt's seed starts "fixed", not the editor's "randomize": a new seed every queue would
//    re-render every shot, where editing shot 3 must re-run shot 3 and later only. A saved workflow's
//    own setting still wins (configure runs after this).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const WORKFLOWS = "/shotstream/workflows";

async function fetchWorkflow(name) {
  const local = name.startsWith("/");
  // "//host/x.json" also starts with "/" but is another site: only this server's paths are fetched
  if (local && new URL(name, window.location.href).origin !== window.location.origin) {
    throw new Error(`ShotStream: ?load= takes a workflow name or a path on this server, not ${name}`);
  }
  const url = local ? name : `${WORKFLOWS}/${encodeURIComponent(name)}`;
  const resp = local ? await fetch(url) : await api.fetchApi(url);
  if (!resp.ok) throw new Error(`ShotStream: cannot load workflow ${name} (${resp.status} from ${url})`);
  return await resp.json();
}

// Show the whole graph (old UIs do not restore the saved view); keeps clear of the floating menu on the right.
function fitToView(margin = 40, menuWidth = 220) {
  const nodes = app.graph._nodes;
  if (!nodes?.length) return;
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const x0 = Math.min(...nodes.map((n) => n.pos[0]));
  const y0 = Math.min(...nodes.map((n) => n.pos[1] - title));
  const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
  const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
  const el = app.canvas.canvas;
  const scale = Math.min(1, (el.clientWidth - 2 * margin - menuWidth) / (x1 - x0), (el.clientHeight - 2 * margin) / (y1 - y0));
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [margin / scale - x0, margin / scale - y0];  // screen = (pos + offset) * scale
  app.canvas.setDirty(true, true);
}

async function loadFromAddress() {
  const name = new URLSearchParams(window.location.search).get("load");
  if (!name) return;
  try {
    const graph = await fetchWorkflow(name);
    await app.loadGraphData(graph);
    fitToView();
    window.shotstreamLoaded = { name, nodes: graph.nodes.length };  // read by the browser test
  } catch (err) {
    console.error(err);
    window.shotstreamLoadError = String(err);
  }
}

function showText(node, lines) {
  let widget = node.widgets?.find((w) => w.name === "summary");
  if (!widget && !lines.length) return;  // nothing to say, and no earlier text to clear
  if (!widget) {
    widget = ComfyWidgets.STRING(node, "summary", ["STRING", { multiline: true }], app).widget;
    widget.options.serialize = false;  // display only: never sent as an input
    if (widget.inputEl) widget.inputEl.readOnly = true;
  }
  widget.value = lines.join("\n");
  const [w, h] = node.computeSize();  // grow to fit the text, never shrink below the user's size
  node.setSize([Math.max(w, node.size[0]), Math.max(h, node.size[1])]);
  app.graph.setDirtyCanvas(true, false);
}

const NEW_STORY_WIDGETS = ["width", "height", "frames_per_shot"];
const STORY_STARTERS = ["NextShotGenerate", "ShotFromImages"];  // nodes with those widgets

function syncNewStoryWidgets(node) {
  const continues = node.inputs?.find((i) => i.name === "state")?.link != null;
  for (const w of node.widgets ?? []) {
    if (NEW_STORY_WIDGETS.includes(w.name)) w.disabled = continues;
  }
  node.setDirtyCanvas?.(true, false);
}

app.registerExtension({
  name: "ShotStream.Workflows",
  async setup() {
    await loadFromAddress();  // runs after the app restored its last workflow, so ?load= wins
  },
  nodeCreated(node) {
    if (node.comfyClass !== "ShotPrompt") return;
    const control = node.widgets?.find((w) => w.name === "control_after_generate");
    if (control) control.value = "fixed";
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (STORY_STARTERS.includes(nodeData.name)) {
      // called for each input on load (LGraphNode.configure) and on every link change
      const onConnectionsChange = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function () {
        onConnectionsChange?.apply(this, arguments);
        syncNewStoryWidgets(this);
      };
      if (nodeData.name === "ShotFromImages") return;  // it has no notes to show
    } else if (nodeData.name !== "CacheState" && nodeData.name !== "LoadShotStream") {
      return;
    }
    // Story State shows its summary, Next Shot and the loader their notes (a caption cut to the model's
    // text length; a teacher loaded as the streaming model)
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) showText(this, message.text);
    };
  },
});
