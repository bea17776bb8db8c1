// A tiny PNG chart writer (pngjs, no fonts): line or grouped-bar charts over categorical x values,
// linear or log y axis, a few series and a legend of colored boxes. Enough for bench results.
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';

import { PNG } from 'pngjs';

import { GLYPH_HEIGHT, GLYPH_WIDTH, glyph } from './chart-font.js';

export interface Series {
  name: string;
  /** One value per x label; null or non-finite = no point. */
  values: (number | null)[];
}

export interface ChartSpec {
  title: string;
  xLabel: string;
  yLabel: string;
  xLabels: string[];
  series: Series[];
  kind?: 'line' | 'bar';
  logY?: boolean;
  width?: number;
  height?: number;
}

type Rgb = [number, number, number];
const PALETTE: Rgb[] = [
  [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
  [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
];
const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [225, 225, 225];
const TEXT_SCALE = 2;
const CHAR_W = (GLYPH_WIDTH + 1) * TEXT_SCALE;

/** A raster with just the drawing operations the charts need. */
export class Canvas {
  readonly png: PNG;
  constructor(readonly width: number, readonly height: number) {
    this.png = new PNG({ width, height });
    this.png.data.fill(255);
  }
  pixel(x: number, y: number, c: Rgb): void {
    x = Math.round(x);
    y = Math.round(y);
    if (x < 0 || y < 0 || x >= this.width || y >= this.height) return;
    const i = (y * this.width + x) * 4;
    this.png.data[i] = c[0];
    this.png.data[i + 1] = c[1];
    this.png.data[i + 2] = c[2];
    this.png.data[i + 3] = 255;
  }
  rect(x0: number, y0: number, w: number, h: number, c: Rgb): void {
    for (let y = Math.round(y0); y < Math.round(y0 + h); y++)
      for (let x = Math.round(x0); x < Math.round(x0 + w); x++) this.pixel(x, y, c);
  }
  /** A line of the given thickness (square brush), by stepping along the longer axis. */
  line(x0: number, y0: number, x1: number, y1: number, c: Rgb, thickness = 1): void {
    const steps = Math.max(1, Math.ceil(Math.max(Math.abs(x1 - x0), Math.abs(y1 - y0))));
    const off = Math.floor((thickness - 1) / 2);
    for (let s = 0; s <= steps; s++) {
      const x = x0 + ((x1 - x0) * s) / steps;
      const y = y0 + ((y1 - y0) * s) / steps;
      this.rect(Math.round(x) - off, Math.round(y) - off, thickness, thickness, c);
    }
  }
  /** Text with its top-left corner at (x, y); returns the width drawn. */
  text(x: number, y: number, s: string, c: Rgb = BLACK, scale = TEXT_SCALE): number {
    let cx = Math.round(x);
    for (const ch of s) {
      const rows = glyph(ch);
      for (let r = 0; r < GLYPH_HEIGHT; r++)
        for (let b = 0; b < GLYPH_WIDTH; b++)
          if ((rows[r]! >> (GLYPH_WIDTH - 1 - b)) & 1) this.rect(cx + b * scale, y + r * scale, scale, scale, c);
      cx += (GLYPH_WIDTH + 1) * scale;
    }
    return cx - x;
  }
  /** Text rotated 90 degrees counter-clockwise, reading bottom to top, its bottom at (x, y). */
  textUp(x: number, y: number, s: string, c: Rgb = BLACK, scale = TEXT_SCALE): void {
    let cy = Math.round(y);
    for (const ch of s) {
      const rows = glyph(ch);
      for (let r = 0; r < GLYPH_HEIGHT; r++)
        for (let b = 0; b < GLYPH_WIDTH; b++)
          if ((rows[r]! >> (GLYPH_WIDTH - 1 - b)) & 1) this.rect(x + r * scale, cy - (b + 1) * scale, scale, scale, c);
      cy -= (GLYPH_WIDTH + 1) * scale;
    }
  }
  encode(): Buffer {
    return PNG.sync.write(this.png);
  }
}

export const textWidth = (s: string, scale = TEXT_SCALE): number => s.length * (GLYPH_WIDTH + 1) * scale;

/** A short tick label: 1.5, 20, 1.2K, 3M, 2e-4. */
export function tickLabel(v: number): string {
  const a = Math.abs(v);
  if (v === 0) return '0';
  if (a >= 1e6) return `${+(v / 1e6).toPrecision(3)}M`;
  if (a >= 1e4) return `${+(v / 1e3).toPrecision(3)}K`;
  if (a < 1e-3) return v.toExponential(0);
  return `${+v.toPrecision(3)}`;
}

/** Evenly spaced "nice" ticks (1, 2, 5 x 10^n) from 0 (or below min) past max. */
export function niceTicks(min: number, max: number, target = 5): number[] {
  if (!(max > min)) max = min + 1;
  const raw = (max - min) / target;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
  const ticks: number[] = [];
  for (let v = Math.floor(min / step) * step; v < max + step * 0.999; v += step) ticks.push(+v.toPrecision(12));
  return ticks;
}

export function renderChart(spec: ChartSpec): Canvas {
  const width = spec.width ?? 900;
  const legendCols = Math.max(1, Math.floor((width - 80) / 280));
  const legendRows = Math.ceil(spec.series.length / legendCols);
  const height = spec.height ?? 520 + legendRows * 22;
  const cv = new Canvas(width, height);
  const left = 90;
  const right = 24;
  const top = 44;
  const bottom = 70 + legendRows * 22;
  const plotW = width - left - right;
  const plotH = height - top - bottom;

  cv.text((width - textWidth(spec.title)) / 2, 12, spec.title);

  // y range from the finite values (log: positive values only)
  const vals = spec.series.flatMap((s) => s.values).filter((v): v is number =>
    v !== null && Number.isFinite(v) && (!spec.logY || v > 0));
  let ticks: number[];
  let yOf: (v: number) => number;
  if (spec.logY) {
    const lo = Math.floor(Math.log10(vals.length ? Math.min(...vals) : 1));
    const hi = Math.max(lo + 1, Math.ceil(Math.log10(vals.length ? Math.max(...vals) : 10)));
    ticks = [];
    // few decades: label 1-2-5 steps too, else the axis has only two numbers
    for (let e = lo; e <= hi; e++)
      for (const m of hi - lo <= 2 ? [1, 2, 5] : [1]) if (e < hi || m === 1) ticks.push(+(m * 10 ** e).toPrecision(6));
    yOf = (v) => top + plotH - ((Math.log10(v) - lo) / (hi - lo)) * plotH;
  } else {
    const maxV = vals.length ? Math.max(...vals) : 1;
    const minV = Math.min(0, ...vals);
    ticks = niceTicks(minV, maxV);
    const t0 = ticks[0]!;
    const t1 = ticks[ticks.length - 1]!;
    yOf = (v) => top + plotH - ((v - t0) / (t1 - t0)) * plotH;
  }
  for (const t of ticks) {
    const y = yOf(t);
    cv.line(left, y, left + plotW, y, GRID);
    const label = tickLabel(t);
    cv.text(left - 8 - textWidth(label), y - (GLYPH_HEIGHT * TEXT_SCALE) / 2, label);
  }
  cv.line(left, top, left, top + plotH, BLACK, 2);
  cv.line(left, top + plotH, left + plotW, top + plotH, BLACK, 2);
  cv.textUp(8, top + plotH / 2 + textWidth(spec.yLabel) / 2, spec.yLabel);

  // x: categorical slots
  const n = Math.max(1, spec.xLabels.length);
  const slot = plotW / n;
  const xOf = (i: number) => left + slot * (i + 0.5);
  spec.xLabels.forEach((label, i) => {
    cv.line(xOf(i), top + plotH, xOf(i), top + plotH + 5, BLACK);
    cv.text(xOf(i) - textWidth(label) / 2, top + plotH + 10, label);
  });
  cv.text(left + (plotW - textWidth(spec.xLabel)) / 2, top + plotH + 32, spec.xLabel);

  const base = spec.logY ? top + plotH : yOf(0);
  spec.series.forEach((s, si) => {
    const color = PALETTE[si % PALETTE.length]!;
    if (spec.kind === 'bar') {
      const barW = Math.max(2, (slot * 0.8) / spec.series.length);
      s.values.forEach((v, i) => {
        if (v === null || !Number.isFinite(v) || (spec.logY && v <= 0)) return;
        const x = xOf(i) - slot * 0.4 + si * barW;
        const y = yOf(v);
        cv.rect(x, Math.min(y, base), Math.max(1, barW - 1), Math.abs(base - y), color);
      });
    } else {
      let prev: [number, number] | null = null;
      s.values.forEach((v, i) => {
        if (v === null || !Number.isFinite(v) || (spec.logY && v <= 0)) {
          prev = null;
          return;
        }
        const p: [number, number] = [xOf(i), yOf(v)];
        if (prev) cv.line(prev[0], prev[1], p[0], p[1], color, 2);
        cv.rect(p[0] - 3, p[1] - 3, 7, 7, color);
        prev = p;
      });
    }
  });

  // legend: colored boxes under the x label
  const ly0 = top + plotH + 56;
  const colW = (width - left) / legendCols;
  spec.series.forEach((s, si) => {
    const x = left + (si % legendCols) * colW;
    const y = ly0 + Math.floor(si / legendCols) * 22;
    cv.rect(x, y, 14, 14, PALETTE[si % PALETTE.length]!);
    const maxChars = Math.floor((colW - 24) / CHAR_W);
    cv.text(x + 20, y, s.name.length > maxChars ? `${s.name.slice(0, maxChars - 1)}.` : s.name);
  });
  return cv;
}

export function writeChart(file: string, spec: ChartSpec): void {
  mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  writeFileSync(file, renderChart(spec).encode());
}
