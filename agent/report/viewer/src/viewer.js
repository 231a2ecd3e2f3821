// The 3D anomaly-volume viewer of a part report (agent/report). Bundled by esbuild into
// agent/report/static/viewer.min.js, which the report inlines: no network, no CDN.
//
// window.AnomalyViewer.mount(container, data) draws the voxels of one part's anomaly volume as
// points (world frame, metres, z up), the defect boxes with their ids and the camera positions, with
// orbit / zoom / pan (OrbitControls) and a minimum-score slider. ``data`` is what
// agent/report/volume_view.py writes:
//   voxel_size, origin [3]        a point is at origin + (ijk + 0.5) * voxel_size
//   ijk   base64 int16 N x 3      little-endian, sorted by ascending score
//   rgb   base64 uint8 N x 3      colours (the report's colour scale)
//   score base64 float32 N
//   threshold, n_volume           the verdict threshold; voxels in the whole volume (N may be a subsample)
//   defects [{id, min, max, centroid, peak}], cameras [[x, y, z], ...]

import {
  BufferGeometry,
  Box3,
  Box3Helper,
  Color,
  Float32BufferAttribute,
  PerspectiveCamera,
  Points,
  PointsMaterial,
  Scene,
  Vector3,
  WebGLRenderer,
} from "three";
import { OrbitControls } from "three/examples/jsm/controls/OrbitControls.js";

function decode(base64, ArrayType) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return new ArrayType(bytes.buffer, 0, bytes.byteLength / ArrayType.BYTES_PER_ELEMENT);
}

function element(tag, attrs, parent, text) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  if (parent) parent.appendChild(el);
  return el;
}

// first index whose score is >= value (scores ascending)
function lowerBound(scores, value) {
  let lo = 0;
  let hi = scores.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (scores[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function mount(container, data) {
  container.classList.add("av-root");
  const stage = element("div", { class: "av-stage" }, container);
  const bar = element("div", { class: "av-bar" }, container);
  let renderer;
  try {
    renderer = new WebGLRenderer({ antialias: true });
  } catch (err) {
    stage.textContent = "This browser cannot show the 3D view (WebGL is not available). The PLY export opens in MeshLab or CloudCompare.";
    stage.classList.add("av-nowebgl");
    return null;
  }
  renderer.setPixelRatio(window.devicePixelRatio || 1);
  renderer.setClearColor(new Color(0x1b1f24));
  stage.appendChild(renderer.domElement);

  const ijk = decode(data.ijk, Int16Array);
  const rgb = decode(data.rgb, Uint8Array);
  const scores = decode(data.score, Float32Array);
  const n = scores.length;
  const s = data.voxel_size;
  const positions = new Float32Array(3 * n);
  const colours = new Float32Array(3 * n);
  for (let i = 0; i < 3 * n; i++) {
    positions[i] = data.origin[i % 3] + (ijk[i] + 0.5) * s;
    colours[i] = rgb[i] / 255;
  }
  const geometry = new BufferGeometry();
  geometry.setAttribute("position", new Float32BufferAttribute(positions, 3));
  geometry.setAttribute("color", new Float32BufferAttribute(colours, 3));
  const scene = new Scene();
  // a point a little wider than its voxel: the surface reads as a surface, not as a lattice of dots
  const voxels = new Points(geometry, new PointsMaterial({ size: 1.6 * s, sizeAttenuation: true, vertexColors: true }));
  scene.add(voxels);

  const bounds = new Box3();
  if (n > 0) {
    geometry.computeBoundingBox();
    bounds.copy(geometry.boundingBox);
  }
  const boxes = [];
  for (const d of data.defects || []) {
    const box = new Box3(new Vector3(...d.min), new Vector3(...d.max));
    const helper = new Box3Helper(box, new Color(0xff40ff));
    scene.add(helper);
    boxes.push(helper);
    bounds.union(box);
  }
  const cameraGeometry = new BufferGeometry();
  cameraGeometry.setAttribute("position", new Float32BufferAttribute((data.cameras || []).flat(), 3));
  const cameraMarks = new Points(cameraGeometry, new PointsMaterial({ size: 7, sizeAttenuation: false, color: 0xe0e0e0 }));
  cameraMarks.visible = false;
  scene.add(cameraMarks);

  const centre = bounds.isEmpty() ? new Vector3() : bounds.getCenter(new Vector3());
  const radius = bounds.isEmpty() ? 0.1 : Math.max(bounds.getSize(new Vector3()).length() / 2, 4 * s);
  const camera = new PerspectiveCamera(40, 1, radius / 100, radius * 100);
  camera.up.set(0, 0, 1); // the cell frame is z up
  const controls = new OrbitControls(camera, renderer.domElement);
  const home = () => {
    camera.position.copy(centre).add(new Vector3(1.2, -1.8, 1.2).normalize().multiplyScalar(radius * 2.8));
    controls.target.copy(centre);
    controls.update();
  };

  const labels = (data.defects || []).map((d) => {
    const el = element("div", { class: "av-label" }, stage, `#${d.id}`);
    return { el, at: new Vector3(...d.max) };
  });
  const projected = new Vector3();
  const render = () => {
    renderer.render(scene, camera);
    const w = stage.clientWidth;
    const h = stage.clientHeight;
    for (const { el, at } of labels) {
      projected.copy(at).project(camera);
      const visible = boxes.length && boxes[0].visible && projected.z < 1;
      el.style.display = visible ? "block" : "none";
      el.style.left = `${((projected.x + 1) / 2) * w}px`;
      el.style.top = `${((1 - projected.y) / 2) * h}px`;
    }
  };
  const resize = () => {
    const w = Math.max(stage.clientWidth, 1);
    const h = Math.max(stage.clientHeight, 1);
    renderer.setSize(w, h);
    camera.aspect = w / h;
    camera.updateProjectionMatrix();
    render();
  };
  controls.addEventListener("change", render);

  // the control bar: minimum score, toggles, reset
  const maxScore = n > 0 ? scores[n - 1] : 0;
  const sliderLabel = element("label", { class: "av-control" }, bar, "min score ");
  const slider = element("input", { type: "range", min: "0", max: String(Math.max(maxScore, data.threshold)), step: "any", value: "0" }, sliderLabel);
  const count = element("span", { class: "av-count" }, bar);
  const setMin = (value) => {
    const start = lowerBound(scores, value);
    geometry.setDrawRange(start, n - start);
    const subsample = n < data.n_volume ? ` (a sample of the ${data.n_volume} voxels of the volume)` : "";
    count.textContent = `${n - start} of ${n} voxels with score >= ${Number(value).toFixed(2)}${subsample}`;
    render();
  };
  slider.addEventListener("input", () => setMin(parseFloat(slider.value)));
  const toggle = (text, initial, onChange) => {
    const label = element("label", { class: "av-control" }, bar);
    const box = element("input", { type: "checkbox" }, label);
    box.checked = initial;
    label.appendChild(document.createTextNode(` ${text}`));
    box.addEventListener("change", () => {
      onChange(box.checked);
      render();
    });
  };
  if (boxes.length) toggle("defect boxes", true, (on) => boxes.forEach((b) => (b.visible = on)));
  if ((data.cameras || []).length) toggle("cameras", false, (on) => (cameraMarks.visible = on));
  const thresholdButton = element("button", { type: "button" }, bar, "above threshold only");
  thresholdButton.addEventListener("click", () => {
    slider.value = String(data.threshold);
    setMin(data.threshold);
  });
  const reset = element("button", { type: "button" }, bar, "reset view");
  reset.addEventListener("click", () => {
    home();
    render();
  });

  home();
  setMin(0);
  if (typeof ResizeObserver !== "undefined") new ResizeObserver(resize).observe(stage);
  resize();
  return { renderer, scene, camera, controls, setMin };
}

window.AnomalyViewer = { mount };
