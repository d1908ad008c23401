package de.medizininformatik_initiative.omi.dsf;

import org.junit.Assume;
import java.util.Arrays;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.IOException;
import java.lang.reflect.Constructor;
import java.lang.reflect.Field;
import java.lang.reflect.Method;
import java.net.URISyntaxException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Collections;
import java.util.Deque;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.function.Function;
import java.util.stream.Collectors;
import java.util.stream.Stream;
import java.util.zip.ZipEntry;
import java.util.zip.ZipFile;

import org.junit.Test;
import org.objectweb.asm.ClassReader;
import org.objectweb.asm.ClassVisitor;
import org.objectweb.asm.ClassWriter;
import org.objectweb.asm.FieldVisitor;
import org.objectweb.asm.Handle;
import org.objectweb.asm.Label;
import org.objectweb.asm.MethodVisitor;
import org.objectweb.asm.Opcodes;
import org.objectweb.asm.Type;

/**
 * Proves that the glue classes link on DSF 2.x, which runs process API v1 plugins on Operaton instead
 * of Camunda.
 * <p>
 * DSF 2.x loads a v1 plugin through {@code dev.dsf.bpe.v1.plugin.ProcessPluginClassLoader}, which rewrites
 * the byte code: in super classes, interfaces, field and method descriptors, throws clauses, the owners and
 * descriptors of field and method instructions, type instructions, LDC constants and the descriptors (not
 * the owners) of invokedynamic method handles, {@code org/camunda/bpm} becomes {@code org/operaton/bpm};
 * member names are kept, except that a call of {@code UserTask.getCamundaFormKey()} is mapped to
 * {@code org/operaton/bpm/bpm/model/bpmn/instance/UserTask.getOperatonFormKey()}, a class that does not
 * exist. Try/catch types, {@code MULTIANEWARRAY} descriptors, the owners of method handles and annotations
 * are not rewritten. Operaton renamed some Camunda members (e.g. {@code getCamundaFormKey} to
 * {@code getOperatonFormKey}), so a plugin compiled against Camunda can fail with
 * {@code NoSuchMethodError} / {@code NoClassDefFoundError} on DSF 2.x although it loads on DSF 1.x.
 * <p>
 * This test applies that rule to every compiled class of the plugin and resolves every reference that
 * involves {@code org/camunda/bpm} by reflection against Operaton (test scope, the version DSF 2.1's v1
 * API is built against). References to DSF's v1 API ({@code dev/dsf/...}) are resolved against DSF 2.x's
 * own v1 API jar ({@code dev.dsf:dsf-bpe-process-api-v1-operaton}, taken from the local Maven repository
 * if installed there; read with ASM, as its classes have the same names as the 1.x API on the test class
 * path and are compiled for a newer Java). It also checks that every method that overrides a Camunda / DSF
 * method on DSF 1.x still overrides one on DSF 2.x and that no inherited abstract method is left
 * unimplemented there (AbstractMethodError). DSF 2.x also shows a v1 plugin only the BPE classes that its
 * {@code bpe/api/v1/allowed-bpe-classes.list} names (a class, its package or a parent package); where the DSF
 * 2.x BPE server jar is at hand ({@code dsf2.bpe.server.jar}, by default in /opt/dsf-2.1.0) every Operaton
 * class the plugin uses must be on it. Tests run the checker on synthetic classes to show that it reports
 * what would break.
 */
public class OperatonCompatibilityTest
{
	private static final String CAMUNDA = "org/camunda/bpm";
	private static final String OPERATON = "org/operaton/bpm";
	private static final String DSF = "dev/dsf/";

	private static final String OPERATON_VERSION = System.getProperty("operaton.version", "1.0.3");
	private static final String DSF2_VERSION = System.getProperty("dsf2.version", "2.1.0");

	/** the BPE classes DSF 2.x shows v1 plugins, read from its BPE server jar; null if that jar is not here */
	private static final Set<String> ALLOWED_BPE_CLASSES = allowedBpeClasses();

	private static Set<String> allowedBpeClasses()
	{
		String jar = System.getProperty("dsf2.bpe.server.jar");
		if (jar == null || !Files.isRegularFile(Paths.get(jar)))
			return null;
		try (ZipFile zip = new ZipFile(jar))
		{
			ZipEntry entry = zip.getEntry("bpe/api/v1/allowed-bpe-classes.list");
			if (entry == null)
				return null;
			Set<String> allowed = new HashSet<>();
			for (String line : new String(zip.getInputStream(entry).readAllBytes(), StandardCharsets.UTF_8).split("\\R"))
				if (!line.isBlank() && !line.strip().startsWith("#"))
					allowed.add(line.strip());
			return allowed;
		}
		catch (IOException e)
		{
			throw new UncheckedIOException(e);
		}
	}

	/**
	 * Supertypes and members of a class, from its byte code (plugin classes, DSF 2.x's v1 API, which is compiled
	 * for a newer Java than this test may run on) or by reflection (Operaton and everything else).
	 */
	private static final class Info
	{
		final String name;
		final boolean isInterface;
		final String superName;
		final List<String> interfaces;
		/** name + descriptor -> access flags (java.lang.reflect.Modifier and ASM use the same bits) */
		final Map<String, Integer> methods = new LinkedHashMap<>();
		final Map<String, Integer> fields = new LinkedHashMap<>();

		Info(String name, boolean isInterface, String superName, List<String> interfaces)
		{
			this.name = name;
			this.isInterface = isInterface;
			this.superName = superName;
			this.interfaces = interfaces;
		}

		static Info of(Class<?> c)
		{
			Info info = new Info(Type.getInternalName(c), c.isInterface(),
					c.getSuperclass() != null ? Type.getInternalName(c.getSuperclass())
							: c.isInterface() ? "java/lang/Object" : null,
					Stream.of(c.getInterfaces()).map(Type::getInternalName).collect(Collectors.toList()));
			for (Method m : c.getDeclaredMethods())
				info.methods.put(m.getName() + Type.getMethodDescriptor(m), m.getModifiers());
			for (Constructor<?> k : c.getDeclaredConstructors())
				info.methods.put("<init>" + Type.getConstructorDescriptor(k), k.getModifiers());
			for (Field f : c.getDeclaredFields())
				info.fields.put(f.getName() + Type.getDescriptor(f.getType()), f.getModifiers());
			return info;
		}
	}

	/**
	 * A runtime's view of the classes: the checked (plugin) classes and the runtime's own API classes from
	 * their byte code, the plugin's as that runtime's class loader would define them, everything else by
	 * reflection through the test's class loader.
	 */
	private static final class World
	{
		final ClassLoader loader;
		final Map<String, Info> local;
		final Map<String, Info> cache = new HashMap<>();
		final Map<String, String> errors = new HashMap<>();

		World(ClassLoader loader, Map<String, Info> local)
		{
			this.loader = loader;
			this.local = local;
		}

		/** null if the class does not exist (or cannot be inspected: see {@link #errors}) */
		Info info(String internalName)
		{
			if (local.containsKey(internalName))
				return local.get(internalName);
			if (cache.containsKey(internalName))
				return cache.get(internalName);
			Info info;
			try
			{
				info = Info.of(Class.forName(internalName.replace('/', '.'), false, loader));
			}
			catch (ClassNotFoundException e)
			{
				info = null;
			}
			catch (LinkageError e)
			{
				info = null;
				errors.put(internalName, e.toString());
			}
			cache.put(internalName, info);
			return info;
		}

		/** all supertypes of a class, itself first, then its superclasses, then its interfaces */
		List<Info> hierarchy(String internalName)
		{
			List<Info> classes = new ArrayList<>();
			List<Info> interfaces = new ArrayList<>();
			Set<String> seen = new HashSet<>();
			for (Info c = info(internalName); c != null && seen.add(c.name); c = c.superName == null ? null : info(c.superName))
				classes.add(c);
			Deque<String> todo = new ArrayDeque<>();
			classes.forEach(c -> todo.addAll(c.interfaces));
			while (!todo.isEmpty())
			{
				Info i = info(todo.poll());
				if (i != null && seen.add(i.name))
				{
					interfaces.add(i);
					todo.addAll(i.interfaces);
				}
			}
			classes.addAll(interfaces);
			return classes;
		}

		/** where the member is declared (and its access flags), searching superclasses and interfaces as the JVM does */
		Map.Entry<Info, Integer> member(String owner, String nameAndDesc, boolean field)
		{
			List<Info> all = hierarchy(owner);
			if (!field && nameAndDesc.startsWith("<init>"))
				all = all.isEmpty() ? all : all.subList(0, 1);
			for (Info i : all)
			{
				Integer access = (field ? i.fields : i.methods).get(nameAndDesc);
				if (access != null)
					return Map.entry(i, access);
			}
			return null;
		}
	}

	/**
	 * Walks the byte code of the checked classes, rewrites each reference as DSF 2.x's class loader would and
	 * resolves it in DSF 2.x's world; collects what would not link there.
	 */
	private static final class Checker
	{
		final Map<String, byte[]> classes;
		final World dsf1;
		final World dsf2;
		final boolean dsf2Api;
		final Set<String> problems = new LinkedHashSet<>();
		final Set<String> checkedCamunda = new LinkedHashSet<>();
		int camundaReferences;
		int dsfReferences;
		int overrides;
		int abstractMethods;

		/**
		 * @param classes internal name -> byte code of the classes to check (the plugin)
		 * @param loader the test's class loader: Camunda, Operaton and DSF 1.x's v1 API
		 * @param dsf2ApiClasses internal name -> byte code of DSF 2.x's v1 API, empty if not available
		 */
		Checker(Map<String, byte[]> classes, ClassLoader loader, Map<String, byte[]> dsf2ApiClasses)
		{
			this.classes = classes;
			this.dsf2Api = !dsf2ApiClasses.isEmpty();
			Map<String, Info> asCompiled = new HashMap<>();
			Map<String, Info> asRewritten = new HashMap<>();
			dsf2ApiClasses.forEach((name, bytes) -> asRewritten.put(name, read(bytes, Function.identity())));
			classes.forEach((name, bytes) ->
			{
				asCompiled.put(name, read(bytes, Function.identity()));
				asRewritten.put(name, read(bytes, Checker::rewrite));
			});
			dsf1 = new World(loader, asCompiled);
			dsf2 = new World(loader, asRewritten);
		}

		static String rewrite(String s)
		{
			return s == null ? null : s.replace(CAMUNDA, OPERATON);
		}

		static Info read(byte[] bytes, Function<String, String> rename)
		{
			Info[] info = new Info[1];
			new ClassReader(bytes).accept(new ClassVisitor(Opcodes.ASM9)
			{
				@Override
				public void visit(int version, int access, String name, String signature, String superName,
						String[] interfaces)
				{
					info[0] = new Info(name, (access & Opcodes.ACC_INTERFACE) != 0, rename.apply(superName),
							interfaces == null ? List.of()
									: Stream.of(interfaces).map(rename).collect(Collectors.toList()));
				}

				@Override
				public FieldVisitor visitField(int access, String name, String descriptor, String signature,
						Object value)
				{
					info[0].fields.put(name + rename.apply(descriptor), access);
					return null;
				}

				@Override
				public MethodVisitor visitMethod(int access, String name, String descriptor, String signature,
						String[] exceptions)
				{
					info[0].methods.put(name + rename.apply(descriptor), access);
					return null;
				}
			}, ClassReader.SKIP_CODE);
			return info[0];
		}

		static String simpleName(String internalName)
		{
			return internalName.substring(internalName.lastIndexOf('/') + 1);
		}

		/** the part of DSF 2.x's class path a class comes from */
		String where(Info dsf2Type)
		{
			return in(dsf2Type.name);
		}

		String in(String internalName)
		{
			if (internalName.startsWith(OPERATON))
				return "Operaton " + OPERATON_VERSION;
			if (internalName.startsWith(DSF) && dsf2Api)
				return "the DSF " + DSF2_VERSION + " v1 API";
			return "the DSF " + DSF2_VERSION + " class path";
		}

		String notFoundIn(String internalName)
		{
			String error = dsf2.errors.get(internalName);
			return error == null ? "not found in " + in(internalName)
					: "cannot be inspected in " + in(internalName) + " (" + error + ")";
		}

		void run()
		{
			classes.values().forEach(this::checkReferences);
			classes.keySet().forEach(this::checkOverrides);
		}

		/** a class used by name (internal name or array descriptor): its (rewritten) class must exist */
		void type(String at, String internalName, boolean rewritten, String what)
		{
			type(at, Type.getObjectType(internalName), rewritten, what);
		}

		void type(String at, Type t, boolean rewritten, String what)
		{
			if (t.getSort() == Type.ARRAY)
				t = t.getElementType();
			if (t.getSort() != Type.OBJECT)
				return;
			String name = t.getInternalName();
			boolean camunda = name.startsWith(CAMUNDA);
			if (!camunda && !(dsf2Api && name.startsWith(DSF)))
				return;
			count(camunda, at + ": " + what + " " + name);
			if (camunda && !rewritten)
				problems.add(at + ": " + name + " (" + what + ") is not rewritten by DSF 2.x and does not exist there");
			else if (dsf2.info(rewrite(name)) == null)
				problems.add(at + ": " + name + " -> " + rewrite(name) + ": " + notFoundIn(rewrite(name)));
			else
				visible(at, rewrite(name), what);
		}

		/** an Operaton class must be one that DSF 2.x shows v1 plugins (a class, package or parent package listed) */
		void visible(String at, String internalName, String what)
		{
			if (ALLOWED_BPE_CLASSES == null || !internalName.startsWith(OPERATON))
				return;
			String className = internalName.replace('/', '.');
			if (ALLOWED_BPE_CLASSES.contains(className))
				return;
			String[] packages = className.substring(0, className.lastIndexOf('.')).split("\\.");
			for (int n = packages.length; n >= 2; n--)
				if (ALLOWED_BPE_CLASSES.contains(String.join(".", Arrays.copyOf(packages, n))))
					return;
			problems.add(at + ": " + internalName + " (" + what + ") is hidden from v1 plugins on DSF " + DSF2_VERSION
					+ ": neither it nor its package is in the BPE's bpe/api/v1/allowed-bpe-classes.list"
					+ " (NoClassDefFoundError)");
		}

		void descriptor(String at, String descriptor, boolean rewritten, String what)
		{
			if (descriptor == null)
				return;
			Type t = Type.getType(descriptor);
			if (t.getSort() == Type.METHOD)
			{
				for (Type a : t.getArgumentTypes())
					type(at, a, rewritten, what);
				type(at, t.getReturnType(), rewritten, what);
			}
			else
				type(at, t, rewritten, what);
		}

		void count(boolean camunda, String reference)
		{
			if (camunda)
			{
				camundaReferences++;
				checkedCamunda.add(reference);
			}
			else
				dsfReferences++;
		}

		/**
		 * A field or method that a DSF 2.x class uses: its (rewritten) owner must have it, with the (rewritten)
		 * descriptor, of the right kind (static or not, class or interface).
		 */
		void member(String at, int opcode, String owner, String name, String desc, boolean isInterface,
				boolean ownerRewritten, boolean descRewritten)
		{
			boolean field = opcode == Opcodes.GETFIELD || opcode == Opcodes.PUTFIELD || opcode == Opcodes.GETSTATIC
					|| opcode == Opcodes.PUTSTATIC;
			boolean camunda = owner.contains(CAMUNDA) || desc.contains(CAMUNDA);
			String reference = owner + "#" + name + desc;
			if (owner.startsWith("["))
			{
				// clone() of an array
				type(at, owner, ownerRewritten, "array type of " + reference);
				descriptor(at, desc, descRewritten, "descriptor of " + reference);
				return;
			}
			if (!ownerRewritten && owner.contains(CAMUNDA) || !descRewritten && desc.contains(CAMUNDA))
			{
				count(true, at + ": " + reference);
				problems.add(at + ": " + reference + " is used in a method handle, whose owner"
						+ (descRewritten ? "" : " and descriptor") + " DSF 2.x does not rewrite: " + CAMUNDA
						+ " does not exist there (NoClassDefFoundError)");
				return;
			}
			if (CAMUNDA_FORM_KEY_OWNER.equals(owner) && "getCamundaFormKey".equals(name)
					&& "()Ljava/lang/String;".equals(desc))
			{
				count(true, at + ": " + reference);
				problems.add(at + ": " + reference + " -> " + OPERATON + "/bpm/model/bpmn/instance/UserTask#"
						+ "getOperatonFormKey ()Ljava/lang/String;: DSF 2.x maps this call to a class that does not"
						+ " exist (NoClassDefFoundError); read the formKey attribute instead");
				return;
			}

			String newOwner = ownerRewritten ? rewrite(owner) : owner;
			String newDesc = descRewritten ? rewrite(desc) : desc;
			String target = owner + " -> " + newOwner + "#" + name + " " + newDesc;
			Map.Entry<Info, Integer> found = dsf2.info(newOwner) == null ? null
					: dsf2.member(newOwner, name + newDesc, field);
			String declaring = found == null ? newOwner : found.getKey().name;
			boolean external = !classes.containsKey(declaring);
			if (!external || !dsf2Api && (declaring.startsWith(DSF) || classes.containsKey(owner)))
			{
				// a member of the plugin itself is declared and used with the same rewrite; without DSF 2.x's
				// v1 API (DSF 1.x's Camunda signatures in its place) only the Operaton side of DSF's can be checked
				descriptor(at, desc, descRewritten, "descriptor of " + reference);
				return;
			}
			if (!camunda && !declaring.startsWith(DSF) && !declaring.startsWith(OPERATON))
				return;
			count(camunda, at + ": " + reference);

			if (dsf2.info(newOwner) == null)
			{
				problems.add(at + ": " + target + ": class " + newOwner + " " + notFoundIn(newOwner));
				return;
			}
			if (found == null)
			{
				problems.add(at + ": " + target + ": not found in " + where(dsf2.info(newOwner)));
				return;
			}
			visible(at, newOwner, "owner of " + reference);
			boolean isStatic = (found.getValue() & Opcodes.ACC_STATIC) != 0;
			boolean wantStatic = opcode == Opcodes.INVOKESTATIC || opcode == Opcodes.GETSTATIC
					|| opcode == Opcodes.PUTSTATIC || opcode == H_STATIC;
			boolean checkStatic = opcode != H_ANY && !name.equals("<init>");
			if (checkStatic && isStatic != wantStatic)
				problems.add(at + ": " + target + ": is " + (isStatic ? "" : "not ") + "static in "
						+ where(found.getKey()) + " (IncompatibleClassChangeError)");
			if (!field && opcode != H_ANY && opcode != H_STATIC && isInterface != dsf2.info(newOwner).isInterface)
				problems.add(at + ": " + target + ": " + newOwner + " is " + (isInterface ? "not " : "")
						+ "an interface in " + where(dsf2.info(newOwner)) + " (IncompatibleClassChangeError)");
		}

		/** a method handle: DSF 2.x rewrites its descriptor (as a bootstrap argument), never its owner */
		void handle(String at, Handle h, boolean descRewritten)
		{
			int tag = h.getTag();
			int opcode = switch (tag)
			{
				case Opcodes.H_GETFIELD -> Opcodes.GETFIELD;
				case Opcodes.H_PUTFIELD -> Opcodes.PUTFIELD;
				case Opcodes.H_GETSTATIC -> Opcodes.GETSTATIC;
				case Opcodes.H_PUTSTATIC -> Opcodes.PUTSTATIC;
				case Opcodes.H_INVOKESTATIC -> H_STATIC;
				default -> H_ANY;
			};
			member(at + " (method handle)", opcode, h.getOwner(), h.getName(), h.getDesc(), h.isInterface(), false,
					descRewritten);
		}

		void checkReferences(byte[] bytes)
		{
			new ClassReader(bytes).accept(new ClassVisitor(Opcodes.ASM9)
			{
				String className;

				@Override
				public void visit(int version, int access, String name, String signature, String superName,
						String[] interfaces)
				{
					className = simpleName(name);
					if (superName != null)
						type(className, superName, true, "super class");
					if (interfaces != null)
						for (String i : interfaces)
							type(className, i, true, "interface");
				}

				@Override
				public FieldVisitor visitField(int access, String name, String descriptor, String signature,
						Object value)
				{
					descriptor(className + "." + name, descriptor, true, "field type");
					return null;
				}

				@Override
				public MethodVisitor visitMethod(int access, String methodName, String methodDescriptor,
						String signature, String[] exceptions)
				{
					String method = className + "." + methodName;
					descriptor(method, methodDescriptor, true, "method descriptor");
					if (exceptions != null)
						for (String e : exceptions)
							type(method, e, true, "throws clause");

					return new MethodVisitor(Opcodes.ASM9)
					{
						int line = -1;
						final Map<Label, Integer> lines = new HashMap<>();
						final Map<Label, List<String>> catches = new LinkedHashMap<>();

						String at()
						{
							return method + " (line " + line + ")";
						}

						@Override
						public void visitLineNumber(int line, Label start)
						{
							this.line = line;
							lines.putIfAbsent(start, line);
						}

						@Override
						public void visitTypeInsn(int opcode, String type)
						{
							type(at(), type, true, "type instruction");
						}

						@Override
						public void visitMultiANewArrayInsn(String descriptor, int numDimensions)
						{
							type(at(), descriptor, false, "MULTIANEWARRAY");
						}

						@Override
						public void visitFieldInsn(int opcode, String owner, String name, String descriptor)
						{
							member(at(), opcode, owner, name, descriptor, false, true, true);
						}

						@Override
						public void visitMethodInsn(int opcode, String owner, String name, String descriptor,
								boolean isInterface)
						{
							member(at(), opcode, owner, name, descriptor, isInterface, true, true);
						}

						@Override
						public void visitInvokeDynamicInsn(String name, String descriptor, Handle bootstrap,
								Object... arguments)
						{
							descriptor(at(), descriptor, true, "invokedynamic descriptor");
							handle(at(), bootstrap, false);
							for (Object a : arguments)
							{
								if (a instanceof Handle h)
									handle(at(), h, true);
								else if (a instanceof Type t)
									descriptor(at(), t.getDescriptor(), true, "invokedynamic argument");
							}
						}

						@Override
						public void visitLdcInsn(Object value)
						{
							if (value instanceof Type t)
								descriptor(at(), t.getDescriptor(), true, "class constant");
							else if (value instanceof Handle h)
								handle(at(), h, false);
							else if (value instanceof String s && s.contains(CAMUNDA.replace('/', '.')))
								problems.add(at() + ": string constant \"" + s + "\" names " + CAMUNDA.replace('/', '.')
										+ ", which DSF 2.x does not rewrite and does not have");
						}

						@Override
						public void visitTryCatchBlock(Label start, Label end, Label handler, String type)
						{
							if (type != null)
								catches.computeIfAbsent(handler, k -> new ArrayList<>()).add(type);
						}

						@Override
						public void visitEnd()
						{
							catches.forEach((handler, types) -> types.forEach(type -> type(
									method + " (line " + lines.getOrDefault(handler, -1) + ")", type, false, "catch")));
						}
					};
				}
			}, 0);
		}

		/**
		 * Every method that overrides a supertype's method on DSF 1.x must still override one on DSF 2.x (else the
		 * engine never calls it), and a concrete class must implement every abstract method it inherits there.
		 */
		void checkOverrides(String className)
		{
			Info compiled = dsf1.info(className);
			Info rewritten = dsf2.info(className);
			String simple = simpleName(className);
			if (!dsf2Api && dsf2.hierarchy(className).stream().anyMatch(t -> t.name.startsWith(DSF)))
				return; // DSF 1.x's API in place of 2.x's would not match the rewritten methods
			for (String method : compiled.methods.keySet())
			{
				int access = compiled.methods.get(method);
				if ((access & (Opcodes.ACC_STATIC | Opcodes.ACC_PRIVATE)) != 0 || method.startsWith("<"))
					continue;
				String overridden = overridden(dsf1, className, method);
				if (overridden == null || !(overridden.startsWith(CAMUNDA) || overridden.startsWith(DSF)
						|| method.contains(CAMUNDA)))
					continue;
				overrides++;
				String name = method.substring(0, method.indexOf('('));
				String newMethod = rewrite(method);
				if (overridden(dsf2, className, newMethod) == null)
					problems.add(simple + "." + name + ": overrides " + overridden + "#" + method + " on DSF 1.x, but no"
							+ " supertype of " + className + " declares " + name + " " + newMethod.substring(name.length())
							+ " on DSF " + DSF2_VERSION + " (Operaton " + OPERATON_VERSION + "): it would never be called");
			}
			if (rewritten.isInterface || (classAccess(className) & Opcodes.ACC_ABSTRACT) != 0)
				return;
			List<Info> hierarchy = dsf2.hierarchy(className);
			Set<String> seen = new HashSet<>();
			for (Info type : hierarchy)
				for (Map.Entry<String, Integer> m : type.methods.entrySet())
					if ((m.getValue() & Opcodes.ACC_ABSTRACT) != 0 && seen.add(m.getKey()))
					{
						abstractMethods++;
						if (!implemented(hierarchy, m.getKey()))
							problems.add(simple + ": does not implement " + type.name + "#" + m.getKey() + " of "
									+ where(type) + " (AbstractMethodError)");
					}
		}

		int classAccess(String className)
		{
			return new ClassReader(classes.get(className)).getAccess();
		}

		/** the proper supertype that declares an overridable method, or null */
		static String overridden(World world, String className, String method)
		{
			List<Info> hierarchy = world.hierarchy(className);
			for (Info type : hierarchy.subList(Math.min(1, hierarchy.size()), hierarchy.size()))
			{
				Integer access = type.methods.get(method);
				if (access != null && (access & (Opcodes.ACC_STATIC | Opcodes.ACC_PRIVATE)) == 0)
					return type.name;
			}
			return null;
		}

		static boolean implemented(List<Info> hierarchy, String method)
		{
			for (Info type : hierarchy)
			{
				Integer access = type.methods.get(method);
				if (access != null && (access & (Opcodes.ACC_ABSTRACT | Opcodes.ACC_STATIC)) == 0)
					return true;
			}
			return false;
		}
	}

	private static final String CAMUNDA_FORM_KEY_OWNER = CAMUNDA + "/model/bpmn/instance/UserTask";
	/** pseudo opcodes for method handles: static method, any other method */
	private static final int H_STATIC = -2, H_ANY = -1;

	/** the classes of DSF 2.x's v1 API jar, empty if it is not in the local Maven repository */
	private static Map<String, byte[]> dsf2ApiClasses() throws IOException
	{
		String jar = System.getProperty("dsf2.v1api.jar");
		Map<String, byte[]> classes = new HashMap<>();
		if (jar == null || !Files.isRegularFile(Paths.get(jar)))
			return classes;
		try (ZipFile zip = new ZipFile(jar))
		{
			for (ZipEntry entry : Collections.list(zip.entries()))
				if (entry.getName().endsWith(".class") && !entry.getName().startsWith("META-INF/"))
					classes.put(entry.getName().substring(0, entry.getName().length() - ".class".length()),
							zip.getInputStream(entry).readAllBytes());
		}
		return classes;
	}

	private static Checker checker(Map<String, byte[]> classes) throws IOException
	{
		Checker checker = new Checker(classes, OperatonCompatibilityTest.class.getClassLoader(), dsf2ApiClasses());
		checker.run();
		return checker;
	}

	private static Map<String, byte[]> pluginClasses() throws IOException, URISyntaxException
	{
		Path root = Paths.get(OmiProcessPluginDefinition.class.getProtectionDomain().getCodeSource().getLocation().toURI());
		Map<String, byte[]> classes = new LinkedHashMap<>();
		try (Stream<Path> files = Files.walk(root))
		{
			for (Path file : (Iterable<Path>) files.filter(p -> p.toString().endsWith(".class")).sorted()::iterator)
			{
				byte[] bytes = Files.readAllBytes(file);
				classes.put(new ClassReader(bytes).getClassName(), bytes);
			}
		}
		return classes;
	}

	@Test
	public void glueClassesLinkOnDsf2() throws Exception
	{
		Map<String, byte[]> classes = pluginClasses();
		assertTrue("plugin classes not found: " + classes.keySet(),
				classes.containsKey(Type.getInternalName(WorkItemAnswers.class)) && classes.size() >= 9);

		Checker checker = checker(classes);
		System.out.printf("OperatonCompatibilityTest: %d classes; %d references to %s checked against Operaton %s"
				+ " (%d distinct); %s; %d overriding methods and %d inherited abstract methods checked; %d problems%n",
				classes.size(), checker.camundaReferences, CAMUNDA, OPERATON_VERSION, checker.checkedCamunda.size(),
				checker.dsf2Api ? checker.dsfReferences + " references to the DSF v1 API checked against DSF " + DSF2_VERSION
						: "DSF " + DSF2_VERSION + " v1 API jar not in the local Maven repository ("
								+ System.getProperty("dsf2.v1api.jar") + "): references to DSF's API checked for their "
								+ CAMUNDA + " types only",
				checker.overrides, checker.abstractMethods, checker.problems.size());

		if (!checker.problems.isEmpty())
			fail(checker.problems.size() + " reference(s) of the plugin would break on DSF " + DSF2_VERSION
					+ " (v1 plugins run on Operaton " + OPERATON_VERSION + " there):\n  "
					+ String.join("\n  ", checker.problems));
		assertTrue("only " + checker.camundaReferences + " references to " + CAMUNDA + " found, expected > 10: "
				+ checker.checkedCamunda, checker.camundaReferences > 10);
		assertTrue("no overriding method checked", checker.overrides > 0);
	}

	/** A class {@code Synthetic} with one method {@code answer} whose instructions {@code body} writes at line 42. */
	private static Map<String, byte[]> synthetic(java.util.function.Consumer<MethodVisitor> body)
	{
		ClassWriter writer = new ClassWriter(ClassWriter.COMPUTE_MAXS);
		writer.visit(Opcodes.V17, Opcodes.ACC_PUBLIC | Opcodes.ACC_SUPER, "test/Synthetic", null, "java/lang/Object",
				null);
		MethodVisitor mv = writer.visitMethod(Opcodes.ACC_PUBLIC | Opcodes.ACC_STATIC, "answer",
				"(Lorg/camunda/bpm/model/bpmn/instance/UserTask;)Ljava/lang/Object;", null, null);
		mv.visitCode();
		Label start = new Label();
		mv.visitLabel(start);
		mv.visitLineNumber(42, start);
		body.accept(mv);
		mv.visitInsn(Opcodes.ARETURN);
		mv.visitMaxs(0, 0);
		mv.visitEnd();
		writer.visitEnd();
		return Map.of("test/Synthetic", writer.toByteArray());
	}

	@Test
	public void checkerReportsGetCamundaFormKey() throws Exception
	{
		Checker checker = checker(synthetic(mv ->
		{
			mv.visitVarInsn(Opcodes.ALOAD, 0);
			mv.visitMethodInsn(Opcodes.INVOKEINTERFACE, "org/camunda/bpm/model/bpmn/instance/UserTask",
					"getCamundaFormKey", "()Ljava/lang/String;", true);
		}));
		assertEquals("problems: " + checker.problems, 1, checker.problems.size());
		String problem = checker.problems.iterator().next();
		assertTrue(problem, problem.startsWith("Synthetic.answer (line 42): org/camunda/bpm/model/bpmn/instance/UserTask"
				+ "#getCamundaFormKey()Ljava/lang/String; -> org/operaton/bpm/bpm/model/bpmn/instance/UserTask"));
	}

	@Test
	public void checkerReportsRenamedAndUnrewrittenReferences() throws Exception
	{
		Checker checker = checker(synthetic(mv ->
		{
			Label start = new Label(), end = new Label(), handler = new Label(), done = new Label();
			mv.visitTryCatchBlock(start, end, handler, "org/camunda/bpm/engine/delegate/BpmnError");
			mv.visitLabel(start);
			// fine: the same name in Operaton
			mv.visitVarInsn(Opcodes.ALOAD, 0);
			mv.visitMethodInsn(Opcodes.INVOKEINTERFACE, "org/camunda/bpm/model/bpmn/instance/UserTask", "getName",
					"()Ljava/lang/String;", true);
			mv.visitInsn(Opcodes.POP);
			// renamed in Operaton: getCamundaAssignee -> getOperatonAssignee
			mv.visitVarInsn(Opcodes.ALOAD, 0);
			mv.visitMethodInsn(Opcodes.INVOKEINTERFACE, "org/camunda/bpm/model/bpmn/instance/UserTask",
					"getCamundaAssignee", "()Ljava/lang/String;", true);
			mv.visitInsn(Opcodes.POP);
			// a method reference UserTask::getName: the handle's owner stays org/camunda/bpm
			mv.visitInvokeDynamicInsn("apply", "()Ljava/util/function/Function;",
					new Handle(Opcodes.H_INVOKESTATIC, "java/lang/invoke/LambdaMetafactory", "metafactory",
							"(Ljava/lang/invoke/MethodHandles$Lookup;Ljava/lang/String;Ljava/lang/invoke/MethodType;"
									+ "Ljava/lang/invoke/MethodType;Ljava/lang/invoke/MethodHandle;Ljava/lang/invoke/MethodType;)"
									+ "Ljava/lang/invoke/CallSite;",
							false),
					Type.getType("(Ljava/lang/Object;)Ljava/lang/Object;"),
					new Handle(Opcodes.H_INVOKEINTERFACE, "org/camunda/bpm/model/bpmn/instance/UserTask", "getName",
							"()Ljava/lang/String;", true),
					Type.getType("(Lorg/camunda/bpm/model/bpmn/instance/UserTask;)Ljava/lang/String;"));
			mv.visitLabel(end);
			mv.visitJumpInsn(Opcodes.GOTO, done);
			mv.visitLabel(handler);
			mv.visitLineNumber(43, handler);
			mv.visitInsn(Opcodes.POP);
			mv.visitInsn(Opcodes.ACONST_NULL);
			mv.visitLabel(done);
		}));
		List<String> problems = new ArrayList<>(checker.problems);
		assertEquals("problems: " + problems, 3, problems.size());
		assertTrue(problems.get(0), problems.get(0).equals("Synthetic.answer (line 42): org/camunda/bpm/model/bpmn/"
				+ "instance/UserTask -> org/operaton/bpm/model/bpmn/instance/UserTask#getCamundaAssignee ()Ljava/lang/String;:"
				+ " not found in Operaton " + OPERATON_VERSION));
		assertTrue(problems.get(1), problems.get(1).startsWith("Synthetic.answer (line 42) (method handle): "
				+ "org/camunda/bpm/model/bpmn/instance/UserTask#getName()Ljava/lang/String; is used in a method handle"));
		assertTrue(problems.get(2), problems.get(2).startsWith("Synthetic.answer (line 43): "
				+ "org/camunda/bpm/engine/delegate/BpmnError (catch) is not rewritten"));
	}

	@Test
	public void checkerReportsModelApiHiddenFromV1Plugins() throws Exception
	{
		Assume.assumeNotNull("DSF " + DSF2_VERSION + " BPE server jar not here (" + System.getProperty("dsf2.bpe.server.jar")
				+ "): which classes v1 plugins see is not checked", ALLOWED_BPE_CLASSES);
		// UserTask.getAttributeValueNs(..) called on the model.xml interface that declares it: that package is hidden
		Checker checker = checker(synthetic(mv ->
		{
			mv.visitVarInsn(Opcodes.ALOAD, 0);
			mv.visitLdcInsn("http://camunda.org/schema/1.0/bpmn");
			mv.visitLdcInsn("formKey");
			mv.visitMethodInsn(Opcodes.INVOKEINTERFACE, "org/camunda/bpm/model/xml/instance/ModelElementInstance",
					"getAttributeValueNs", "(Ljava/lang/String;Ljava/lang/String;)Ljava/lang/String;", true);
		}));
		assertEquals("problems: " + checker.problems, 1, checker.problems.size());
		String problem = checker.problems.iterator().next();
		assertTrue(problem, problem.contains("org/operaton/bpm/model/xml/instance/ModelElementInstance (owner of")
				&& problem.contains("allowed-bpe-classes.list"));
		// the same call on UserTask itself resolves through a visible interface
		checker = checker(synthetic(mv ->
		{
			mv.visitVarInsn(Opcodes.ALOAD, 0);
			mv.visitLdcInsn("http://camunda.org/schema/1.0/bpmn");
			mv.visitLdcInsn("formKey");
			mv.visitMethodInsn(Opcodes.INVOKEINTERFACE, "org/camunda/bpm/model/bpmn/instance/UserTask",
					"getAttributeValueNs", "(Ljava/lang/String;Ljava/lang/String;)Ljava/lang/String;", true);
		}));
		assertEquals("problems: " + checker.problems, 0, checker.problems.size());
	}
}
