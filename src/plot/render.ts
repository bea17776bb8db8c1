// Renders a Vega-Lite spec: vega-lite compiles it, vega draws SVG (headless, no canvas), resvg
// rasterises the PNG with the DejaVu Sans files of the dejavu-fonts-ttf package (no system fonts,
// so text looks the same on a fresh machine, in the images and in CI). writePlot writes all three.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

import type { TopLevelSpec } from 'vega-lite';

/** The family every plot's text uses; its files ship in an npm package (see fontFiles). */
export const PLOT_FONT = 'DejaVu Sans';

/** A text mark's box in PNG pixels (for tests: where the axis titles and legends were drawn). */
export interface TextBox {
  /** Vega's role of the mark: axis-title, axis-label, legend-title, legend-label, title-text, ... */
  role: string;
  text: string;
  x1: number;
  y1: number;
  x2: number;
  y2: number;
}

export interface RenderedPlot {
  svg: string;
  png: Buffer;
  /** PNG size in pixels (the SVG's size times the scale). */
  width: number;
  height: number;
  textBoxes: TextBox[];
}

export interface RenderOptions {
  /** PNG pixels per SVG unit (default 1). */
  scale?: number;
  /**
   * Font files for resvg (default: DejaVu Sans regular and bold from dejavu-fonts-ttf). Tests pass []
   * to check that a plot without its font is caught.
   */
  fontFiles?: string[];
}

export type PlotFormat = 'png' | 'svg';

export interface WriteOptions extends RenderOptions {
  /** Images to write beside the .vl.json spec (default both). */
  formats?: PlotFormat[];
}

let fontFilesCache: string[] | null = null;

/** DejaVu Sans (regular, bold) inside node_modules/dejavu-fonts-ttf; a clear error if it is missing. */
export function fontFiles(): string[] {
  if (fontFilesCache) return fontFilesCache;
  const require = createRequire(import.meta.url);
  let dir: string;
  try {
    dir = path.join(path.dirname(require.resolve('dejavu-fonts-ttf/package.json')), 'ttf');
  } catch {
    throw new Error('plots need the dejavu-fonts-ttf package for their text (npm install dejavu-fonts-ttf)');
  }
  const files = ['DejaVuSans.ttf', 'DejaVuSans-Bold.ttf'].map((f) => path.join(dir, f));
  for (const f of files) if (!fs.existsSync(f)) throw new Error(`plot font ${f} is missing; reinstall dejavu-fonts-ttf`);
  return (fontFilesCache = files);
}

interface Libs {
  vega: typeof import('vega');
  compile: typeof import('vega-lite').compile;
  Resvg: typeof import('@resvg/resvg-js').Resvg;
}
let libs: Promise<Libs> | null = null;

/** Loaded on first use: the CLI and the daemon do not pay for vega unless they draw. */
function loadLibs(): Promise<Libs> {
  libs ??= (async () => {
    try {
      const [vega, vl, resvg] = await Promise.all([import('vega'), import('vega-lite'), import('@resvg/resvg-js')]);
      return { vega, compile: vl.compile, Resvg: resvg.Resvg };
    } catch (err) {
      libs = null;
      throw new Error(`plots need the vega, vega-lite and @resvg/resvg-js packages (npm install): ${err instanceof Error ? err.message : String(err)}`);
    }
  })();
  return libs;
}

/** Minimal shape of vega's scenegraph that textBoxes walks. */
interface SceneItem {
  x?: number;
  y?: number;
  text?: unknown;
  bounds?: { x1: number; y1: number; x2: number; y2: number };
  items?: SceneMark[];
}
interface SceneMark {
  marktype: string;
  role: string;
  items: SceneItem[];
}

function collectText(mark: SceneMark, ox: number, oy: number, out: TextBox[]): void {
  for (const item of mark.items) {
    if (mark.marktype === 'text') {
      const t = Array.isArray(item.text) ? item.text.join(' ') : String(item.text ?? '');
      if (t && item.bounds) out.push({ role: mark.role, text: t, x1: item.bounds.x1 + ox, y1: item.bounds.y1 + oy, x2: item.bounds.x2 + ox, y2: item.bounds.y2 + oy });
    }
    // Bounds of a group's children are relative to the group's x, y.
    if (mark.marktype === 'group' && item.items) for (const m of item.items) collectText(m, ox + (item.x ?? 0), oy + (item.y ?? 0), out);
  }
}

/** Compiles and draws a Vega-Lite spec into SVG and PNG (white background). */
export async function renderPlot(spec: TopLevelSpec, opts: RenderOptions = {}): Promise<RenderedPlot> {
  const { vega, compile, Resvg } = await loadLibs();
  const vg = compile(spec).spec;
  const view = new vega.View(vega.parse(vg), { renderer: 'none' });
  try {
    await view.runAsync();
    const svg = await view.toSVG();
    const scale = opts.scale ?? 1;
    // The SVG's root group sits at origin + padding (vega's SVG renderer).
    const [ox, oy] = view.origin();
    const pad = view.padding() as { left?: number; top?: number };
    const boxes: TextBox[] = [];
    collectText((view.scenegraph() as unknown as { root: SceneMark }).root, ox + (pad.left ?? 0), oy + (pad.top ?? 0), boxes);
    const r = new Resvg(svg, {
      background: 'white',
      fitTo: { mode: 'zoom', value: scale },
      font: { fontFiles: opts.fontFiles ?? fontFiles(), loadSystemFonts: false, defaultFontFamily: PLOT_FONT, sansSerifFamily: PLOT_FONT },
    });
    const img = r.render();
    const png = img.asPng();
    const textBoxes = boxes.map((b) => ({ ...b, x1: b.x1 * scale, y1: b.y1 * scale, x2: b.x2 * scale, y2: b.y2 * scale }));
    return { svg, png, width: img.width, height: img.height, textBoxes };
  } finally {
    view.finalize();
  }
}

/** FILE.png, FILE.svg, FILE.vl.json from a name with or without one of those endings. */
export function plotFiles(file: string): { png: string; svg: string; spec: string } {
  const base = file.replace(/(\.png|\.svg|\.vl\.json)$/i, '');
  return { png: `${base}.png`, svg: `${base}.svg`, spec: `${base}.vl.json` };
}

/**
 * Writes the plot as .png, .svg and its .vl.json spec (data inline: a user can open it in the
 * Vega editor and restyle it) next to each other; returns the paths (of the images not asked
 * for too, which are then not written) and the PNG size.
 */
export async function writePlot(file: string, spec: TopLevelSpec, opts: WriteOptions = {}): Promise<{ png: string; svg: string; spec: string; width: number; height: number }> {
  const out = plotFiles(file);
  const formats = opts.formats ?? ['png', 'svg'];
  const r = await renderPlot(spec, opts);
  fs.mkdirSync(path.dirname(path.resolve(out.png)), { recursive: true });
  if (formats.includes('png')) fs.writeFileSync(out.png, r.png);
  if (formats.includes('svg')) fs.writeFileSync(out.svg, r.svg);
  fs.writeFileSync(out.spec, `${JSON.stringify(spec, null, 2)}\n`);
  return { ...out, width: r.width, height: r.height };
}
