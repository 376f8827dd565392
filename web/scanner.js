// Reads the device serial from its label through the camera. Browsers' own BarcodeDetector
// exists only in some Chromium builds (not on desktop Linux or Windows, not in Firefox or
// Safari), so the page decodes frames itself with ZXing (zxing.min.js: @zxing/library, pinned,
// vendored byte for byte; see README.md), in a worker (scan-worker.js) started only when an
// installer starts scanning and ended with the camera.
//
// A label often carries more than one code (a serial in Code 128, a QR code with a web
// address, a MAC address...): every frame is read by each family of readers, and the first text
// that looks like a serial is the answer. Frames never leave the page.

const FRAME_INTERVAL_MS = 150;
const GIVE_UP_MS = 120_000;
const DECODER_LOAD_MS = 20_000;
const MAX_FRAME_WIDTH = 1280;

/** Why scanning stopped without a serial: `kind` is one of the keys of `scanWords`. */
export class ScanError extends Error {
  constructor(kind) {
    super(kind);
    this.kind = kind;
  }
}

/** Can this browser show the page a camera at all (a secure context with getUserMedia)? */
export function cameraAvailable() {
  return Boolean(globalThis.isSecureContext && navigator.mediaDevices && navigator.mediaDevices.getUserMedia);
}

function cameraError(e) {
  switch (e && e.name) {
    case 'NotAllowedError':
    case 'SecurityError':
      return new ScanError('blocked');
    case 'NotReadableError':
    case 'AbortError':
      return new ScanError('busy');
    default: // NotFoundError, OverconstrainedError, and any other
      return new ScanError('no-camera');
  }
}

/** The decoding worker, once it has loaded the decoder (bounded: a page on a bad network). */
function startDecoder() {
  return new Promise((resolve, reject) => {
    const worker = new Worker('scan-worker.js');
    const failed = () => {
      clearTimeout(timer);
      worker.terminate();
      reject(new ScanError('decoder'));
    };
    const timer = setTimeout(failed, DECODER_LOAD_MS);
    worker.onerror = failed;
    worker.onmessage = (event) => {
      if (!event.data || !event.data.ready) return;
      clearTimeout(timer);
      worker.onerror = null;
      worker.onmessage = null;
      resolve(worker);
    };
  });
}

/**
 * A camera session: `scan()` resolves with the first code whose text `isSerial` accepts and
 * rejects with a ScanError; `stop()` ends it (the promise then resolves with undefined).
 * `onOther(text)` is told of codes that are not serials. The camera is released, and the
 * worker ended, in every case.
 */
export class Scanner {
  constructor(video, { isSerial, onOther }) {
    this.video = video;
    this.isSerial = isSerial;
    this.onOther = onOther;
    this.stream = undefined;
    this.worker = undefined;
    this.pending = undefined; // the frame the worker is reading: answered [] if stopped
    this.stopped = false;
  }

  async scan() {
    try {
      return await this.run();
    } finally {
      this.release();
    }
  }

  async run() {
    this.worker = await startDecoder();
    if (this.stopped) return undefined;
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: false,
        video: { facingMode: { ideal: 'environment' }, width: { ideal: 1280 }, height: { ideal: 720 } },
      });
    } catch (e) {
      throw cameraError(e);
    }
    if (this.stopped) return undefined; // stopped while the browser asked for the camera
    this.video.srcObject = this.stream;
    await this.video.play().catch(() => {}); // stop() during play() interrupts it: checked below
    const canvas = document.createElement('canvas');
    const context = canvas.getContext('2d', { willReadFrequently: true });
    const startedAt = performance.now();
    while (!this.stopped) {
      if (performance.now() - startedAt > GIVE_UP_MS) throw new ScanError('timeout');
      const { videoWidth, videoHeight } = this.video;
      if (videoWidth && videoHeight) {
        const scale = Math.min(1, MAX_FRAME_WIDTH / videoWidth);
        canvas.width = Math.round(videoWidth * scale);
        canvas.height = Math.round(videoHeight * scale);
        context.drawImage(this.video, 0, 0, canvas.width, canvas.height);
        const texts = await this.decode(context.getImageData(0, 0, canvas.width, canvas.height));
        if (this.stopped) break;
        const serial = texts.find((t) => this.isSerial(t));
        if (serial) return serial;
        if (texts.length) this.onOther(texts[0]);
      }
      await new Promise((resolve) => setTimeout(resolve, FRAME_INTERVAL_MS));
    }
    return undefined;
  }

  /** What the worker reads in one frame. */
  decode(image) {
    return new Promise((resolve, reject) => {
      this.pending = resolve;
      this.worker.onmessage = (event) => {
        this.pending = undefined;
        resolve(event.data.texts || []);
      };
      this.worker.onerror = () => {
        this.pending = undefined;
        reject(new ScanError('decoder'));
      };
      const { width, height, data } = image;
      this.worker.postMessage({ width, height, rgba: data.buffer }, [data.buffer]);
    });
  }

  /** Ends the session, if one is running: the loop sees it at its next step. */
  stop() {
    this.stopped = true;
    this.release();
  }

  release() {
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    this.stream = undefined;
    this.video.srcObject = null;
    if (this.worker) this.worker.terminate();
    this.worker = undefined;
    if (this.pending) this.pending([]);
    this.pending = undefined;
  }
}

/** Why scanning stopped, in an installer's words. */
export function scanWords(kind) {
  const words = {
    blocked: "The camera is blocked for this page: allow it in the browser's site settings, or type the serial.",
    'no-camera': 'No camera this page can use was found: type the serial.',
    busy: 'The camera is in use by another app: close that app and try again, or type the serial.',
    decoder: 'The barcode reader could not be loaded: check the connection and try again, or type the serial.',
    timeout: 'No serial barcode was found, so the camera was turned off: try again closer to the label, or type the serial.',
  };
  return words[kind] || 'Scanning failed: type the serial.';
}
